"""Commands that look at features and circuits: analyse, dashboard, faithfulness, trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._hooks import layer_of
from ._shared import _check_out_dir, _load_images, _read_labels, _rrm, _sae_refs, _step

if TYPE_CHECKING:
    from torch import Tensor

    from ..circuits.graph.graph import AttributionGraph
    from ..circuits.replacement.base import ReplacementModelBase


def _cmd_analyse(args: argparse.Namespace) -> int:
    from ..analyse import run_analysis
    from ..models.embedded import embedded_metadata

    n_layers = (
        embedded_metadata(args.model.removeprefix("sve:"))["arch"]["depth"] if args.model.startswith("sve:") else 0
    )
    report = run_analysis(
        args.model,
        _sae_refs(args.saes, args.model, n_layers),
        args.out,
        args.n_images,
        args.seed,
        threshold=args.threshold,
    )
    print(report["table"])
    print(f"analysis pass {report['seconds']:.1f} s; report: {(Path(args.out) / 'analysis.md').resolve()}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from ..models import HookedViT
    from ..saes.loading import load_sae
    from ..vis.dashboard import build_dashboard

    model = HookedViT.from_pretrained(args.model)
    saes = [load_sae(r) for r in _sae_refs(args.saes, args.model, model.cfg.n_layers)]
    saes.sort(key=lambda s: s.cfg.metadata.hook_name)
    pixels, labels, names = _load_images(model, args.dataset, args.n_images, args.seed)
    lens = None
    if model.adapter.output_kind() == "logits":
        from ..circuits.evaluate.logit_lens import logit_lens

        _step("logit lens of every feature (16 reference images)")
        try:
            lens = logit_lens(model, saes, pixels[:16])
        except ValueError as e:  # SAEs off the residual stream, or a readout that is not affine
            print(f"no logit lens: {e}", file=sys.stderr)
        if names is None and model.cfg.class_names:
            names = list(model.cfg.class_names)
    _step("feature statistics and pages")
    index = build_dashboard(
        model,
        saes,
        pixels,
        args.out,
        labels=labels,
        label_names=names,
        top_k=args.top_k,
        n_feature_pages=args.feature_pages,
        n_image_pages=args.image_pages,
        logit_lens=lens,
        feature_labels=_read_labels(args.labels),
    )
    print(f"dashboard written: {index.resolve()}")
    return 0


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    rrm = _rrm(args)
    pixels, labels, _ = _load_images(rrm.model, args.dataset, args.n_images, args.seed)
    rows = rrm.faithfulness(pixels, labels, progress=True)
    keys = [k for k in rows[0] if k != "n_spliced"]
    print("layers spliced (no error terms) | " + " | ".join(keys))
    for row in rows:
        print(f"{row['n_spliced']:>31} | " + " | ".join(f"{row[k]:.4f}" for k in keys))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    _check_out_dir(Path(args.out) / "circuit-tracer", "--out")  # its subfolder too, before any work
    _step("loading the model and its SAEs")
    rrm = _rrm(args)
    model = rrm.model
    if args.image:
        from PIL import Image

        with Image.open(args.image) as im:
            pixels = model.preprocess(im.convert("RGB"))[None]
    else:  # render only image --shapes-index of the seed's set (images render on demand)
        from ..data.sources import open_image_source

        pixels = open_image_source("sve:shapes", model.preprocess, args.shapes_index + 1, args.seed)[args.shapes_index]
        pixels = pixels[None]
    _step("attributing (one row per active feature)")
    graph = rrm.attribute(
        pixels, target=args.target, max_feature_nodes=args.max_feature_nodes, mlp_leaves=args.mlp_leaves, progress=True
    )
    _step(f"pruning {graph.n_nodes} nodes, {graph.adjacency._nnz()} edges")
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # creatable: checked by _preflight before the model loaded
    from ..circuits.graph.viewer import render_graph_html

    stats = ref = None
    if args.reference_images > 0:  # top patches per feature in the viewer, from a reference set
        from ..vis.stats import collect_feature_stats

        ref, _, _ = _load_images(model, "sve:shapes", args.reference_images, args.seed + 1)
        stats = collect_feature_stats(model, rrm.saes, ref, top_k=4, progress=True)
    slug = Path(args.image).stem if args.image else f"shapes-{args.shapes_index}"
    _step("writing circuit-tracer's files and the viewer")
    labels = {(layer_of(h), f): v for h, fs in (_read_labels(args.labels) or {}).items() for f, v in fs.items()}
    groups, attention = _supernodes_and_attention(args, rrm, pixels, pruned)
    exported = pruned.to_json(
        out / "circuit-tracer" / f"{slug}.json",
        rrm=rrm,
        stats=stats,
        stats_pixels=ref,
        feature_labels=labels,
        pixels=pixels,
        supernodes=groups,
        attention=attention,
    )
    aggregated = None if args.mlp_leaves else rrm.attribute_aggregated(pixels, target=graph.target_classes[0])
    render_graph_html(
        pruned,
        out / "graph.html",
        rrm,
        pixels,
        stats=stats,
        stats_pixels=ref,
        feature_labels=labels,
        aggregated=aggregated,
        supernodes=groups,
        attention=attention,
    )
    from ..circuits.graph.ops import node_influence

    infl = node_influence(graph)
    feats = [i for i, k in enumerate(graph.node_kind) if k == "feature"]
    top = sorted(feats, key=lambda i: -float(infl[i]))[:10]
    summary = {
        "target": graph.target_names,
        "n_nodes": graph.n_nodes,
        "n_edges": int(graph.adjacency._nnz()),
        "kept_nodes": len(exported["nodes"]),
        "kept_edges": len(exported["links"]),
        "scores": pruned.scores(),
        "top_features": [
            {
                "layer": int(graph.node_layer[i]),
                "position": int(graph.node_pos[i]),
                "feature": int(graph.node_feature[i]),
                "activation": float(graph.activation[i]),
                "influence": float(infl[i]),
            }
            for i in top
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"traced {graph.target_names[0]}: {graph.n_nodes} nodes, {summary['n_edges']} edges; kept "
        f"{summary['kept_nodes']} nodes, {summary['kept_edges']} edges"
    )
    print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["scores"].items()))
    from ..circuits.graph.export import cumulative_share
    from ..circuits.graph.nodes import clerps

    names, share = clerps(graph, labels, index=top[:5]), cumulative_share(graph)
    print("top 5 features: influence (cumulative share, as circuit-tracer), raw influence, activation")
    for i, name, row in zip(top, names, summary["top_features"], strict=False):
        print(f"  {name:<44} {float(share[i]):.3f}  raw {row['influence']:.3g}  act {row['activation']:.3g}")
    if "mlp_share" in summary["scores"]:
        print(
            f"  (--mlp-leaves: the MLP outputs are leaf nodes and take {summary['scores']['mlp_share']:.1%} of the "
            "influence; replacement counts only what reaches the input embeddings against the error nodes, so it "
            "is near 0 by construction here: read mlp_share and completeness instead)"
        )
    from ..circuits.graph.export import serve_command

    ct_dir = (out / "circuit-tracer").resolve()
    if groups:
        print(f"supernodes ({args.supernodes}): {len(groups)} in qParams.supernodes and the viewer")
    if attention is not None:
        n_blocks = sum(len(e["blocks"]) for e in attention["edges"])
        print(
            f"attention: {len(attention['edges'])} edges split over heads ({n_blocks} blocks), "
            f"{len(attention['entries'])} QK entries -> {slug}.attention.json"
        )
    print(f"circuit-tracer files: {ct_dir}")
    print(f"  open them in its frontend: {serve_command(ct_dir)}, then http://localhost:8032")
    print(f"viewer (open from disk): {(out / 'graph.html').resolve()}")
    return 0


def _supernodes_and_attention(
    args: argparse.Namespace, rrm: ReplacementModelBase, pixels: Tensor, pruned: AttributionGraph
) -> tuple[list[list[str]], dict[str, Any] | None]:
    """``trace``'s supernodes (``--supernodes``) and attention report (``--attention-edges/-entries``; none
    for ``--mlp-leaves`` graphs, whose edges leave out the MLP paths head loadings include)."""
    from ..circuits.graph.supernodes import exported_supernodes

    groups = [] if args.supernodes == "none" else exported_supernodes(pruned, args.supernodes)
    attention = None
    if args.attention_edges > 0 and not args.mlp_leaves:
        from ..circuits.engine.attention_report import AttentionExport, attention_report

        _step(f"attention: the {args.attention_edges} strongest edges over heads, {args.attention_entries} QK entries")
        config = AttentionExport(max_edges=args.attention_edges, max_entries=args.attention_entries)
        attention = attention_report(rrm, pixels, pruned, config)
    return groups, attention
