"""The transcoder replacement model (``TranscoderReplacementModel``): exact attribution graphs with
layer-skipping edges for every transcoder kind (SAELens Transcoder, SkipTranscoder, JumpReLU variants,
our TopK transcoders, cross-layer transcoders; both input hooks) and adapter family, float64 on tiny random models.

Checks: the sum rule ``Σ_s A[t, s] + constant = h_t``; closed-form rows equal batched-VJP rows; a frozen
intervention with every block's features held (circuit-tracer's ``constrained_layers``) moves every
later feature and the output by exactly ``Δ/a · A[t, s]`` (so every direct edge, layer-skipping ones
included, is the measured direct effect); refusals name what is wrong.
"""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from helpers import FAMILIES, _timm, build_native, images, make_sae
from sae_lens.saes.sae import SAEMetadata

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.models import ResidualReplacementModel, TranscoderReplacementModel
from sae_vision_ext.saes.transcoders import (
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
)

KINDS = {
    "topk_transcoder": (TopKTranscoder, TopKTranscoderConfig),
    "topk_skip_transcoder": (TopKSkipTranscoder, TopKSkipTranscoderConfig),
    "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
    "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
    "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
}
HOOKS = ["ln2.hook_normalized", "hook_resid_mid"]


def make_transcoder(kind: str, layer: int, hook: str, d: int = 32, d_sae: int = 24, seed: int = 0):
    """A random float64 SAELens transcoder of block ``layer`` reading ``blocks.{layer}.{hook}``."""
    cls, cfg_cls = KINDS[kind]
    meta = SAEMetadata(hook_name=f"blocks.{layer}.{hook}", hook_name_out=f"blocks.{layer}.hook_mlp_out")
    extra = {"k": 5} if kind.startswith("topk") else {}
    cfg = cfg_cls(d_in=d, d_sae=d_sae, d_out=d, dtype="float64", apply_b_dec_to_input=False, metadata=meta, **extra)
    tc = cls(cfg).double()
    g = torch.Generator().manual_seed(100 + 7 * layer + seed)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            scale = {"W_enc": 0.4, "W_dec": 0.3, "W_skip": 0.1, "threshold": 0.0}.get(name, 0.1)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        if hasattr(tc, "threshold"):
            tc.threshold.copy_(torch.rand(d_sae, generator=g, dtype=torch.float64) * 0.3)
    return tc


def model_for(variant: str | None = None, depth: int = 4) -> HookedViT:
    if variant is None:
        torch.manual_seed(0)
        native = _timm(depth=depth).eval()
        with torch.no_grad():
            for p in native.parameters():
                p.add_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1 * torch.randn_like(p))
        return HookedViT.from_model(native).double()
    return HookedViT.from_model(build_native(variant)).double()


def demeaned(g, output: torch.Tensor) -> torch.Tensor:
    """The graph's first target direction: its class's logit demeaned over classes (float64)."""
    direction = -torch.full((output.shape[-1],), 1 / output.shape[-1], dtype=torch.float64)
    direction[g.target_classes[0]] += 1
    return direction


def check_exact(tm: TranscoderReplacementModel, x: torch.Tensor, n_sources: int = 2) -> tuple[dict[str, int], object]:
    """Sum rule, closed form = VJP rows, frozen constrained interventions = Δ/a·edge at every later
    target. Returns counts of the checked (source, target) pairs (layer-skipping ones apart) and the graph."""
    g = tm.attribute(x, max_feature_nodes=None)
    A = g.dense()
    rows = ~torch.isnan(g.value)
    assert rows.sum() > len(g.target_names)  # feature rows were computed
    torch.testing.assert_close(A[rows].sum(1) + g.constant[rows], g.value[rows], atol=1e-8, rtol=1e-8)
    ref = tm.attribute(x, max_feature_nodes=None, engine="autograd")
    torch.testing.assert_close(A, ref.dense(), atol=1e-10, rtol=1e-9)
    counts = {"pairs": 0, "skipping": 0}
    all_layers = list(tm.layers)
    targets = [t for t, k in enumerate(g.node_kind) if k in ("feature", "target")]
    for layer in tm.layers:
        sources = [i for i, k in enumerate(g.node_kind) if k == "feature" and g.node_layer[i] == layer][:n_sources]
        for s in sources:
            p, f, a = int(g.node_pos[s]), int(g.node_feature[s]), float(g.activation[s])
            delta = 0.37 * abs(a) + 0.05
            base = tm.intervene(x, [(layer, p, f, a)], freeze=True, constrained_layers=all_layers)
            moved = tm.intervene(x, [(layer, p, f, a + delta)], freeze=True, constrained_layers=all_layers)
            # unchanged feature: the frozen forward gives the graph's target value (the unhooked clean model can
            # differ by float32 rounding: HF AIMv2's RMSNorm runs in float32 unless its scale is hooked)
            t0 = g.node_kind.index("target")
            torch.testing.assert_close(base["output"][0] @ demeaned(g, base["output"]), g.value[t0], atol=1e-10, rtol=0)
            torch.testing.assert_close(base["output"], base["clean_output"], atol=1e-6, rtol=1e-5)
            for t in targets:
                if int(g.node_layer[t]) <= layer:
                    continue
                if g.node_kind[t] == "feature":
                    ts = tm.slot(int(g.node_layer[t]))
                    pt, ft = int(g.node_pos[t]), int(g.node_feature[t])
                    change = moved["feature_pre_acts"][ts][0, pt, ft] - base["feature_pre_acts"][ts][0, pt, ft]
                else:
                    change = (moved["output"][0] - base["output"][0]) @ demeaned(g, moved["output"])
                expected = delta / a * float(A[t, s])
                assert abs(float(change) - expected) < 1e-9 * max(1.0, abs(expected)), (layer, s, t)
                counts["pairs"] += 1
                skips = g.node_kind[t] == "target" or int(g.node_layer[t]) > layer + 1
                counts["skipping"] += int(skips and abs(expected) > 1e-6)
    return counts, g


GRID = [(kind, hook) for kind in KINDS for hook in HOOKS]
QUICK = ("topk_skip_transcoder", "ln2.hook_normalized")


@pytest.mark.parametrize(
    ("kind", "hook"), [pytest.param(*c, marks=[] if c == QUICK else [pytest.mark.slow]) for c in GRID]
)
def test_per_layer_transcoders_are_exact_with_layer_skipping_edges(kind, hook):
    model = model_for(depth=4)
    tm = TranscoderReplacementModel(model, [make_transcoder(kind, layer, hook) for layer in range(4)])
    counts, g = check_exact(tm, images(1).double())
    assert counts["pairs"] > 50 and counts["skipping"] > 20, counts
    # a feature of block 0 reaches features of block 3 directly (two blocks skipped)
    A = g.dense()
    rows3 = (g.node_layer == 3) & torch.tensor([k == "feature" for k in g.node_kind])
    cols0 = (g.node_layer == 0) & torch.tensor([k == "feature" for k in g.node_kind])
    assert A[rows3][:, cols0].abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("variant", FAMILIES)
def test_transcoders_are_exact_on_every_adapter_family(variant, hook):
    model = model_for(variant)
    kinds = ["skip_transcoder", "jumprelu_transcoder"]
    kinds = kinds if hook == HOOKS[0] else ["topk_skip_transcoder", "topk_transcoder"]
    tcs = [make_transcoder(kinds[layer % 2], layer, hook, d=model.cfg.d_model) for layer in range(model.cfg.n_layers)]
    counts, _ = check_exact(TranscoderReplacementModel(model, tcs), images(1, size=model.cfg.image_size[0]).double())
    assert counts["pairs"] > 10 and counts["skipping"] > 0, counts


@pytest.mark.parametrize("layers", [[1], [0, 2], pytest.param([1, 2, 3], marks=pytest.mark.slow)])
def test_any_subset_of_blocks_is_exact_and_untranscoded_mlps_are_error_nodes(layers):
    model = model_for(depth=4)
    x = images(1).double()
    tm = TranscoderReplacementModel(
        model, [make_transcoder("skip_transcoder", layer, HOOKS[layer % 2]) for layer in layers]
    )
    _, g = check_exact(tm, x, n_sources=1)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_mlp_out"))
    for j in set(range(4)) - set(layers):  # whole MLP output = error nodes, no features
        err = [i for i, k in enumerate(g.node_kind) if k == "error" and g.node_layer[i] == j]
        torch.testing.assert_close(g.activation[err], cache[f"blocks.{j}.hook_mlp_out"][0].norm(dim=-1))
        assert not any(k == "feature" and g.node_layer[i] == j for i, k in enumerate(g.node_kind))


def test_node_order_budget_scores_and_circuit_tracer_export(tmp_path):
    model = model_for(depth=3)
    tcs = [make_transcoder("jumprelu_skip_transcoder", layer, "hook_resid_mid") for layer in range(3)]
    tm = TranscoderReplacementModel(model, tcs)
    x = images(1).double()
    g = tm.attribute(x, max_feature_nodes=None)
    kinds, layers = g.node_kind, g.node_layer.tolist()
    order = [(-1 if k == "input" else 99 if k == "target" else layers[i], {"input": 0, "feature": 1, "error": 2,
             "target": 3}[k]) for i, k in enumerate(kinds)]  # fmt: skip
    assert order == sorted(order)  # inputs, then per block features then errors, then targets
    small = tm.attribute(x, max_feature_nodes=10)
    assert int((~torch.isnan(small.value)).sum()) == 10 + len(small.target_names)
    scores = g.prune(0.8, 0.98).scores()
    assert 0 < scores["replacement"] <= 1 and 0 < scores["completeness"] <= 1
    exported = g.prune().to_json(tmp_path / "g.json", features=False)
    assert exported["metadata"]["transcoder_list"] == [f"blocks.{i}.hook_resid_mid" for i in range(3)]
    meta = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert meta["graphs"][0]["slug"] == "g"
    with_features = g.prune().to_json(tmp_path / "f.json", rrm=tm, pixels=x)  # feature files from tm.feature_acts
    codes = [n["feature"] for n in with_features["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert codes and all((tmp_path / "features" / f"{c}.json").exists() for c in codes)
    from sae_vision_ext import render_graph_html

    render_graph_html(g.prune(), tmp_path / "g.html", tm, x)
    assert (tmp_path / "g.html").stat().st_size > 10_000


def test_spliced_keeps_the_model_and_pure_replacement_differs():
    model = model_for(depth=2)
    tm = TranscoderReplacementModel(model, [make_transcoder("skip_transcoder", i, HOOKS[i]) for i in range(2)])
    x = images(2).double()
    clean = model(x)
    with tm.spliced(keep_errors=True):
        torch.testing.assert_close(model(x), clean, atol=1e-12, rtol=1e-12)
    with tm.spliced():
        pure = model(x)
    assert (pure - clean).abs().max() > 1e-3
    # the pure replacement model's MLP outputs are the transcoders' own forward (skip included)
    names = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    with tm.spliced():
        _, c = model.run_with_cache(x, names_filter=lambda n: n in names)
    torch.testing.assert_close(c[names[1]], tm.saes[0](c[names[0]]), atol=1e-12, rtol=1e-12)
    assert len(tm.reference_values(x, "mean")) == 2
    assert tm.reference_values(x, "mean", of="errors")[0].shape == (model.cfg.n_ctx, model.cfg.d_model)


def test_refusals_name_the_problem():
    model = model_for(depth=2)
    tc = make_transcoder("transcoder", 0, "ln2.hook_normalized")
    with pytest.raises(ValueError, match="Two transcoders for block 0"):
        TranscoderReplacementModel(model, [tc, make_transcoder("transcoder", 0, "hook_resid_mid")])
    wrong = make_transcoder("transcoder", 1, "ln2.hook_normalized")
    wrong.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="hook_resid_post"):
        TranscoderReplacementModel(model, [wrong])
    out = make_transcoder("transcoder", 1, "ln2.hook_normalized")
    out.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match=r"must write blocks\.1\.hook_mlp_out"):
        TranscoderReplacementModel(model, [out])
    normed = make_transcoder("transcoder", 1, "ln2.hook_normalized")
    normed.cfg.normalize_activations = "layer_norm"
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        TranscoderReplacementModel(model, [normed])
    sae = make_sae("standard", "none", False, d_in=32, hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="ResidualReplacementModel"):
        TranscoderReplacementModel(model, [sae])
    with pytest.raises(ValueError, match="at least one"):
        TranscoderReplacementModel(model, [])
    # the residual model's attribute refuses transcoders and points here
    residual = ResidualReplacementModel.__new__(ResidualReplacementModel)
    residual.model, residual.layers, residual.saes = model, [0], [tc]
    with pytest.raises(ValueError, match="TranscoderReplacementModel"):
        residual.attribute(images(1).double())


def make_clt(n_layers: int, hook: str, activation: str = "relu", skip: bool = False, d: int = 32, d_sae: int = 12):
    """A random float64 cross-layer transcoder (``saes/clt.py``) spanning ``n_layers`` blocks."""
    from sae_vision_ext.saes.clt import CLTConfig, CrossLayerTranscoder

    k = 4 if activation == "topk" else None
    cfg = CLTConfig(d_in=d, d_sae=d_sae, n_layers=n_layers, activation=activation, k=k, hook_in=hook,
                    skip_connection=skip, dtype="float64")  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            scale = {"W_enc": 0.4, "W_skip": 0.1, "threshold": 0.0}.get(name.split(".")[0], 0.2)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        if clt.threshold is not None:
            clt.threshold.copy_(torch.rand(clt.threshold.shape, generator=g, dtype=torch.float64) * 0.3)
    return clt


CLT_GRID = [("relu", False, "ln2.hook_normalized"), ("jumprelu", True, "hook_resid_mid"),
            ("topk", True, "ln2.hook_normalized"), ("relu", True, "hook_resid_mid")]  # fmt: skip


@pytest.mark.parametrize(
    ("activation", "skip", "hook"),
    [pytest.param(*c, marks=[] if i == 1 else [pytest.mark.slow]) for i, c in enumerate(CLT_GRID)],
)
def test_cross_layer_transcoder_is_exact_with_decoders_to_every_later_block(activation, skip, hook):
    model = model_for(depth=3)
    clt = make_clt(3, hook, activation, skip)
    tm = TranscoderReplacementModel(model, clt)
    x = images(1).double()
    counts, g = check_exact(tm, x)
    assert counts["pairs"] > 30 and counts["skipping"] > 10, counts
    assert tm.layers == [0, 1, 2] and g.transcoder_list == [f"blocks.{i}.{hook}" for i in range(3)]
    # spliced without errors, each MLP output is the CLT's own decode_layer of its inputs
    names = [f"blocks.{i}.{hook}" for i in range(3)] + [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    with tm.spliced():
        _, c = model.run_with_cache(x, names_filter=lambda n: n in names)
    inputs = [c[n] for n in names[:3]]
    acts = [clt.encode_layer(v, i) for i, v in enumerate(inputs)]
    for j in range(3):
        torch.testing.assert_close(c[names[3 + j]], clt.decode_layer(acts, j, inputs[j]), atol=1e-12, rtol=1e-12)


def test_a_clt_alone_and_on_every_block():
    model = model_for(depth=3)
    clt = make_clt(3, "hook_resid_mid")
    with pytest.raises(ValueError, match="one cross-layer transcoder alone"):
        TranscoderReplacementModel(model, [clt, make_transcoder("transcoder", 0, "hook_resid_mid")])
    with pytest.raises(ValueError, match="spans every block"):
        TranscoderReplacementModel(model_for(depth=2), clt)


def test_evaluate_circuit_on_transcoders_ends_at_the_model_and_at_the_all_reference_model():
    from sae_vision_ext import evaluate_circuit

    model = model_for(depth=2)
    tm = TranscoderReplacementModel(model, [make_transcoder("skip_transcoder", i, HOOKS[i]) for i in range(2)])
    x = images(2, seed=4).double()
    ev = evaluate_circuit(tm, x, fractions=[0.0, 0.5, 1.0], reference="zero", n_ablations=2, progress=False)
    with torch.no_grad():
        out = model(x)
    target = out.argmax(-1)
    demeaned = (out.gather(1, target[:, None])[:, 0] - out.mean(-1)).mean()
    curves = ev.curves["influence"]
    assert curves["deletion"]["demeaned_logit"][0] == pytest.approx(float(demeaned), abs=1e-9)
    assert curves["insertion"]["demeaned_logit"][-1] == pytest.approx(float(demeaned), abs=1e-9)
    # every feature at zero: the spliced model with all features off (errors kept)
    with torch.no_grad(), tm.spliced(keep_errors=True, edit=lambda layer, acts: torch.zeros_like(acts)):
        off = model(x)
    off_demeaned = (off.gather(1, target[:, None])[:, 0] - off.mean(-1)).mean()
    assert curves["insertion"]["demeaned_logit"][0] == pytest.approx(float(off_demeaned), abs=1e-9)
    assert abs(float(off_demeaned - demeaned)) > 1e-3
    with pytest.raises(ValueError, match="protocol='ours'"):
        evaluate_circuit(tm, x, protocol="seed", progress=False)
