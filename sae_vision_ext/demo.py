"""The main job behind ``sae-vision demo``, on the embedded shapes model (no network).

Stage 1 (hooked ViT): load ``sve:shapes-vit``, run a cached forward over procedural shapes images,
report accuracy and a per-layer summary of the residual stream and attention.
Stage 2 (SAEs): load the shipped SAE of every residual layer (``sve:<model>/<hook>``), splice each
in and report explained variance, L0, dead features and accuracy with the SAE in place of the layer.
Stage 3 (visualisers): streaming feature statistics over the images and an offline HTML dashboard
(``<out>/index.html``).
Stage 4 (circuits): the residual replacement model's faithfulness per number of spliced layers and
one traced attribution graph, pruned, scored and exported as circuit-tracer JSON; then the same image
traced by the three replacement models side by side (residual SAEs, per-layer transcoders, the
cross-layer transcoder: replacement, completeness, feature nodes for 80% of influence).
Stage 5 (debiasing): find the features carrying the marker shortcut of ``sve:shapes-vit-biased``
and report worst-group and average accuracy before and after ablating them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._hooks import resid_post

if TYPE_CHECKING:
    from sae_lens import SAE
    from torch import Tensor

    from .circuits.graph.graph import AttributionGraph
    from .circuits.models import ResidualReplacementModel
    from .models.hooked_vit import HookedViT

logger = logging.getLogger(__name__)


def run_demo(
    n_images: int = 512, batch_size: int = 128, model_id: str = "sve:shapes-vit", out_dir: str = "sae-vision-demo"
) -> int:
    import torch
    from tqdm import tqdm

    from .data.shapes import SHAPES, make_shapes
    from .models import HookedViT

    model = HookedViT.from_pretrained(model_id)
    cfg = model.cfg
    print(f"Loaded {model_id}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_ctx} tokens per image")
    data = make_shapes(n_images, seed=1)
    images, labels = data.tensors()
    pixels = model.preprocess(images)

    correct, norms, cls_attn_to_self = 0, torch.zeros(cfg.n_layers), torch.zeros(cfg.n_layers)
    names = [resid_post(layer) for layer in range(cfg.n_layers)]
    names += [f"blocks.{layer}.attn.hook_pattern" for layer in range(cfg.n_layers)]
    with torch.no_grad():
        for i in tqdm(range(0, n_images, batch_size), desc="cached forward", unit="batch"):
            x = pixels[i : i + batch_size]
            logits, cache = model.run_with_cache(x, names_filter=names)
            correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
            for layer in range(cfg.n_layers):
                norms[layer] += cache[resid_post(layer)].norm(dim=-1).mean() * len(x)
                cls_attn_to_self[layer] += cache[f"blocks.{layer}.attn.hook_pattern"][:, :, 0, 0].mean() * len(x)
    print(f"\nAccuracy on {n_images} fresh shapes images (seed 1, {len(SHAPES)} classes): {correct / n_images:.3f}")
    print(f"{len(model.hook_dict)} hook points; cached {len(names)} of them per batch.\n")
    print("layer  mean |resid_post|  CLS attention to itself")
    for layer in range(cfg.n_layers):
        print(f"{layer:>5}  {norms[layer] / n_images:>17.2f}  {cls_attn_to_self[layer] / n_images:>23.3f}")
    saes = sae_stage(model, model_id, pixels, labels)
    rrm, pruned = circuit_stage(model, saes, pixels, labels, out_dir)
    replacement_kinds_stage(model, model_id, rrm, pixels[:1])
    dashboard_stage(model, saes, pixels, labels, out_dir, circuit=pruned)
    viewer_stage(rrm, pruned, pixels, labels, out_dir)
    debias_stage(*((768, 3000) if n_images >= 512 else (256, 256)))  # small runs: a quick version
    return 0


def debias_stage(n_search: int = 768, n_test: int = 3000) -> dict:
    """Stage 5: find the marker shortcut of ``sve:shapes-vit-biased`` from group labels alone (on a
    balanced search split) and report worst-group / average accuracy on a held-out balanced split."""
    import torch

    from .circuits.evaluate.debias import debias, find_spurious_features, group_accuracy
    from .circuits.models import ResidualReplacementModel
    from .data.shapes import SHAPES, make_shapes
    from .models import HookedViT
    from .saes.loading import load_sae

    model = HookedViT.from_pretrained("sve:shapes-vit-biased")
    saes = [load_sae(f"sve:shapes-vit-biased/blocks.{layer}.hook_resid_post") for layer in range(model.cfg.n_layers)]

    def split(n: int, seed: int):
        data = make_shapes(n, seed=seed, balanced=True)
        raw, labels = data.tensors()
        return model.preprocess(raw), labels, torch.from_numpy(data.factors["marker"]).long()

    px, y, g = split(n_search, 21)
    found = find_spurious_features(ResidualReplacementModel(model, saes), px, y, g, progress=True)
    print(
        f"\nDebiasing sve:shapes-vit-biased: the marker (group label only, location not given) is associated "
        f"with '{SHAPES[found.associated_class]}'; {found.n_conflict} conflict images; "
        f"{len(found.candidates)} candidate features, {found.n_selected} selected on the search split:"
    )
    print(found.table(8))
    tx, ty, tg = split(n_test, 2)
    debiased = debias(model, saes, found.selected, found.reference)
    rows = {}
    with torch.no_grad():
        for name, m in (("original", model), ("debiased", debiased)):
            pred = torch.cat([m(tx[i : i + 256]) for i in range(0, len(tx), 256)]).argmax(-1)
            acc = group_accuracy(pred, ty, tg)
            worst = min(acc, key=acc.get)
            rows[name] = {
                "average": float((pred == ty).float().mean()),
                "worst_group": acc[worst],
                "worst": f"{SHAPES[worst[0]]}{' + marker' if worst[1] else ''}",
            }
    print(f"\nHeld-out balanced split ({n_test} images):  average  worst group")
    for name, r in rows.items():
        print(f"{name:>40}  {r['average']:.3f}    {r['worst_group']:.3f} ({r['worst']})")
    return rows


def circuit_stage(model: HookedViT, saes: list[SAE], pixels: Tensor, labels: Tensor, out_dir: str) -> AttributionGraph:
    """Stage 4: faithfulness of the pure replacement model and one attribution graph."""
    from pathlib import Path

    from .circuits.graph.export import serve_command
    from .circuits.models import ResidualReplacementModel
    from .data.shapes import SHAPES

    rrm = ResidualReplacementModel(model, saes)
    n = min(256, len(pixels))
    print("\nResidual replacement model (SAEs on layers 0..n-1 replace the residual stream, no error terms),")
    print(f"on the first {n} of the {len(pixels)} images above (accuracy in brackets: the original model on them):")
    print("layers spliced  top-1 agreement  KL      accuracy (original)")
    for row in rrm.faithfulness(pixels[:n], labels[:n]):
        print(
            f"{row['n_spliced']:>14}  {row['top1_agreement']:>15.3f}  {row['kl']:.4f}  "
            f"{row['accuracy']:.3f} ({row['accuracy_clean']:.3f})"
        )
    graph = rrm.attribute(pixels[:1], batch_size=64)
    pruned = graph.prune()
    path = Path(out_dir) / "circuit-tracer" / "shapes-demo.json"
    from .vis.stats import collect_feature_stats

    ref = pixels[1:257]  # reference images: density, percentiles, histogram and top examples of each feature
    stats = collect_feature_stats(model, saes, ref, top_k=4, progress=False)
    from .circuits.engine.attention_report import attention_report
    from .circuits.graph.supernodes import exported_supernodes

    groups = exported_supernodes(pruned, "feature")  # each feature's positions: qParams.supernodes
    attention = attention_report(rrm, pixels[:1], pruned)  # heads of the 50 strongest edges, 20 QK entries
    pruned.to_json(
        path, rrm=rrm, stats=stats, stats_pixels=ref, pixels=pixels[:1], supernodes=groups, attention=attention
    )
    s = pruned.scores()
    label = SHAPES[int(labels[0])]
    print(
        f"\nAttribution graph of image 0 ({label}) for {graph.target_names[0]} ({SHAPES[graph.target_classes[0]]}): "
        f"{graph.n_nodes} nodes; pruned to {int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges"
    )
    print(
        f"scores: replacement {s['replacement']:.3f} (pruned {s['replacement_pruned']:.3f}), "
        f"completeness {s['completeness']:.3f} (pruned {s['completeness_pruned']:.3f})"
    )
    print(
        f"{len(groups)} supernodes (by feature) in qParams.supernodes; {len(attention['edges'])} edges split over "
        f"heads and {len(attention['entries'])} attention entries in {path.stem}.attention.json"
    )
    print(f"circuit-tracer files: {path.parent.resolve()}")
    print(f"  open them in its frontend: {serve_command(path.parent)}, then http://localhost:8032")
    return rrm, pruned


def replacement_kinds_stage(
    model: HookedViT, model_id: str, rrm: ResidualReplacementModel, pixels: Tensor
) -> list[dict[str, float]]:
    """Stage 4b: one image traced (every feature row) by the residual SAEs, the embedded per-layer
    transcoders and the embedded CLT (``sve:<model>/transcoders``, ``sve:<model>/clt``); a model without
    embedded transcoders gets the residual row only."""
    from .circuits.graph.supernodes import influence_coverage
    from .circuits.models import TranscoderReplacementModel
    from .saes.loading import load_sae

    kinds: list[tuple[str, object]] = [("residual SAEs", rrm)]
    for name, ref in (("per-layer transcoders", "transcoders"), ("cross-layer transcoder", "clt")):
        try:
            kinds.append((name, TranscoderReplacementModel(model, load_sae(f"{model_id}/{ref}"))))
        except ValueError as e:  # no embedded transcoders for this model
            logger.info("no %s for %s: %s", name, model_id, e)
    print("\nThe same image, three replacement models (every feature row; pruned at 0.8 / 0.98):")
    print("replacement model        feature nodes  replacement  completeness  (pruned)        nodes for 80%")
    rows = []
    for name, kind in kinds:
        graph = kind.attribute(pixels, max_feature_nodes=None)
        s = graph.prune().scores()
        row = {**s, "feature_nodes": graph.node_kind.count("feature"), "nodes_80": influence_coverage(graph)}
        rows.append(row)
        print(
            f"{name:<24} {row['feature_nodes']:>13,}  {s['replacement']:>11.3f}  {s['completeness']:>12.3f}  "
            f"({s['replacement_pruned']:.3f}, {s['completeness_pruned']:.3f})  {row['nodes_80']:>13,}"
        )
    return rows


def viewer_stage(
    rrm: ResidualReplacementModel, pruned: AttributionGraph, pixels: Tensor, labels: Tensor, out_dir: str
) -> None:
    """Stage 5: the graph viewer, linked to the dashboard pages of the circuit's features."""
    import json
    from pathlib import Path

    from .circuits.graph.supernodes import exported_supernodes
    from .circuits.graph.viewer import render_graph_html
    from .data.shapes import SHAPES
    from .vis.stats import collect_feature_stats

    attention = Path(out_dir) / "circuit-tracer" / "shapes-demo.attention.json"  # written by circuit_stage
    ref = pixels[1:257]
    stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=4, progress=False)
    viewer = render_graph_html(
        pruned,
        Path(out_dir) / "graph.html",
        rrm,
        pixels[:1],
        dashboard_dir="dashboard",
        title=f"image 0 ({SHAPES[int(labels[0])]})",
        stats=stats,
        stats_pixels=ref,
        aggregated=rrm.attribute_aggregated(pixels[:1], target=pruned.target_classes[0]),
        supernodes=exported_supernodes(pruned, "feature"),
        attention=json.loads(attention.read_text()) if attention.exists() else None,
    )
    print(f"graph viewer (open from disk): {viewer.resolve()}")


def circuit_features(pruned: AttributionGraph, per_layer: int = 8) -> dict[str, list[int]]:
    """The ``per_layer`` most influential features of each layer of a pruned graph (for dashboard pages)."""
    from .circuits.graph.export import exported_masks
    from .circuits.graph.ops import node_influence

    shown, _ = exported_masks(pruned)
    infl = node_influence(pruned)
    out: dict[str, list[int]] = {}
    order = infl.argsort(descending=True).tolist()
    for i in order:
        if pruned.node_kind[i] == "feature" and bool(shown[i]):
            feats = out.setdefault(resid_post(int(pruned.node_layer[i])), [])
            f = int(pruned.node_feature[i])
            if f not in feats and len(feats) < per_layer:
                feats.append(f)
    return out


def dashboard_stage(
    model: HookedViT,
    saes: list[SAE],
    pixels: Tensor,
    labels: Tensor,
    out_dir: str,
    *,
    circuit: dict[str, list[int]] | None = None,
) -> None:
    """Stage 4: feature statistics, the logit lens and the offline dashboard (pages for the features a
    user looks for, and for the traced circuit's features)."""
    from pathlib import Path

    from .circuits.evaluate.logit_lens import logit_lens
    from .data.shapes import SHAPES
    from .vis.dashboard import build_dashboard

    lens = logit_lens(model, saes, pixels[:16])
    extra = circuit_features(circuit) if circuit is not None else None
    index = build_dashboard(
        model,
        saes,
        pixels,
        Path(out_dir) / "dashboard",
        labels=labels,
        label_names=SHAPES,
        n_feature_pages=8,
        n_image_pages=6,
        logit_lens=lens,
        extra_features=extra,
    )
    print(f"\nDashboard (open from disk, no server needed): {index.resolve()}")


def sae_stage(model: HookedViT, model_id: str, pixels: Tensor, labels: Tensor) -> list[SAE]:
    """Stage 2: evaluate the shipped SAE of every residual layer with the SAE spliced in."""
    from .saes.evaluate import evaluate_sae
    from .saes.loading import load_sae

    name = model_id.removeprefix("sve:")
    print(f"\nSAEs (load_sae('sve:{name}/blocks.L.hook_resid_post')), spliced one at a time, no error term:")
    print("layer  d_sae   k    L0   explained var  dead*  accuracy (clean -> spliced)")
    saes = []
    for layer in range(model.cfg.n_layers):
        sae = load_sae(f"sve:{name}/blocks.{layer}.hook_resid_post")
        saes.append(sae)
        m = evaluate_sae(model, sae, pixels, labels, batch_size=128)
        acc = m["accuracy"]
        print(
            f"{layer:>5}  {m['d_sae']:>5}  {sae.cfg.k:>3}  {m['l0']:>5.1f}  {m['explained_variance']:>13.3f}  "
            f"{m['dead_fraction']:>4.2f}   {acc['clean']:.3f} -> {acc['spliced']:.3f}"
        )
    print("* dead: share of features that never fire on these images")
    return saes
