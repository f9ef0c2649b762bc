"""Attribution graphs: our batched rows against a per-target Jacobian baseline, and graph time as
tokens and layers grow.

Part 1 (same image, same SAEs, ``sve:shapes-vit`` with its shipped SAEs): the baseline computes each
target's row RRM-style, one ``torch.func.jacrev`` of the target pre-activation with respect to the
source layer's residual per target (a full frozen forward each). Ours computes every row of the
graph from one frozen forward with batched vector-Jacobian products. Reported: per-row seconds,
their ratio, and the largest edge difference over the sampled targets.

Part 2: graph time on a ViT-B/16-sized random timm model with random TopK SAEs, for 50 / 197
tokens (image 112 / 224) and 4 / 8 / 12 layers, with a ``max_feature_nodes`` budget (a full ViT-B
graph has ~75k active features).

Part 3 (issue 13's targets), ViT-B/16-sized, 197 tokens, 12 layers, TopK d_sae 3072 k 32 on every
layer: (a) the row engine alone, closed form (``engine="staged"``) against plain batched VJPs
(``engine="autograd"``) on the same budgeted graph, with the FLOP floor computed from the shapes
(``rows.row_macs`` at this machine's float32 matmul rate, measured in the same run) and the achieved
fraction; (b) a budgeted graph of 7,500 feature nodes including the forwards, pruning and
circuit-tracer export.

    python -m benchmarks.bench_attribution [--targets 48] [--budget 128] [--rows-vit-b 512] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._timing import markdown_table


def _shapes_rrm():
    import sae_vision_ext as sve
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post").float() for layer in range(6)]
    pixels = model.preprocess(sve.make_shapes(1, seed=11).tensors()[0])
    return ResidualReplacementModel(model, saes), pixels


def jacobian_row(rrm, pixels, frozen, layer: int, pos: int, feat: int, acts, errors) -> torch.Tensor:
    """Baseline: one target's incoming edges from ``jacrev`` of its pre-activation (one full frozen
    forward per target), in the graph's source order (active features of ``layer - 1``, errors)."""
    from torch.func import jacrev

    from sae_vision_ext.circuits.replacement.linearise import frozen_hooks, pre_capture_hooks

    model = rrm.model
    src_hook = f"blocks.{layer - 1}.hook_resid_post.hook_sae_output"

    def h(x_src: torch.Tensor) -> torch.Tensor:
        box = {}
        hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen)
        hooks += [(src_hook, lambda t, hook: x_src[None].expand_as(t)),
                  (f"blocks.{layer}.hook_resid_post.hook_sae_acts_pre",
                   lambda t, hook: box.setdefault("pre", t))]  # fmt: skip
        with rrm.spliced(keep_errors=True), model.hooks(fwd_hooks=hooks):
            model(pixels, stop_at_layer=layer + 1)
        return box["pre"][0, pos, feat] * norm_t  # SAELens multiplies by |W_dec[f]| after this hook

    # these SAEs have no input normalisation; with rescale_acts_by_decoder_norm an activation a stands
    # for a·W_dec[f]/|W_dec[f]| in the residual and the activation equals hook_sae_acts_pre·|W_dec[f]|
    rescale = getattr(rrm.saes[layer].cfg, "rescale_acts_by_decoder_norm", False)
    norm_t = float(rrm.saes[layer].W_dec[feat].norm()) if rescale else 1.0
    x0 = torch.zeros_like(errors[layer - 1])
    g = jacrev(h)(x0)  # the map is affine under freezing: the Jacobian does not depend on x0
    sp, sf = acts[layer - 1].nonzero().unbind(1)
    w_dec = rrm.saes[layer - 1].W_dec.detach()
    if getattr(rrm.saes[layer - 1].cfg, "rescale_acts_by_decoder_norm", False):
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    feature_w = (g[sp] * w_dec[sf]).sum(-1) * acts[layer - 1][sp, sf]
    return torch.cat([feature_w, (g * errors[layer - 1]).sum(-1)])


def part1(name: str, rrm, pixels, n_targets: int, budget: int | None) -> list[object]:
    from sae_vision_ext.circuits.engine.attribution import Attributor

    t0 = time.perf_counter()
    graph = Attributor(rrm, batch_size=64).attribute(pixels, max_feature_nodes=budget)
    ours = time.perf_counter() - t0
    n_rows = int((~torch.isnan(graph.value)).sum())
    frozen = rrm.frozen_state(pixels)[0]
    with torch.no_grad():
        acts = [a[0] for a in rrm.feature_acts(pixels)]
        _, cache = rrm.model.run_with_cache_with_saes(pixels, saes=rrm.saes, use_error_term=True,
                                                      names_filter=lambda n: n.endswith("hook_sae_error"))  # fmt: skip
    errors = [cache[f"blocks.{i}.hook_resid_post.hook_sae_error"][0] for i in range(rrm.n_layers)]
    adjacency = graph.adjacency.coalesce()
    gen = torch.Generator().manual_seed(0)
    candidates = [i for i, k in enumerate(graph.node_kind)
                  if k == "feature" and graph.node_layer[i] > 0 and not torch.isnan(graph.value[i])]  # fmt: skip
    picks = [candidates[int(j)] for j in torch.randperm(len(candidates), generator=gen)[:n_targets]]
    worst, t0 = 0.0, time.perf_counter()
    for t in picks:
        layer, pos, feat = int(graph.node_layer[t]), int(graph.node_pos[t]), int(graph.node_feature[t])
        row = jacobian_row(rrm, pixels, frozen, layer, pos, feat, acts, errors).detach()
        src = [i for i, k in enumerate(graph.node_kind) if graph.node_layer[i] == layer - 1 and k != "mlp"]
        ours_row = adjacency.index_select(0, torch.tensor([t])).to_dense()[0, src].float()  # never densify A
        worst = max(worst, float((ours_row - row).abs().max()))
    baseline = (time.perf_counter() - t0) / len(picks)
    per_row = ours / n_rows
    return [name, n_rows, f"{per_row * 1e3:.2f}", f"{baseline * 1e3:.1f}", f"{baseline / per_row:.1f}x",
            f"{worst:.1e}"]  # fmt: skip


def _random_vit_b(depth: int, img_size: int, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    import sae_vision_ext as sve
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    torch.manual_seed(seed)
    model = sve.HookedViT.from_pretrained("timm:vit_base_patch16_224", pretrained=False, depth=depth,
                                          img_size=img_size)  # fmt: skip
    saes = []
    for layer in range(depth):
        meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
        sae = TopKSAE(TopKSAEConfig(d_in=768, d_sae=3072, k=32, metadata=meta))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.05)
        saes.append(sae)
    pixels = torch.randn(1, 3, img_size, img_size)
    return ResidualReplacementModel(model, saes), pixels


def part2(budget: int, quick: bool) -> list[list[object]]:
    rows = []
    settings = [(112, 4), (224, 4)] if quick else [(112, 4), (112, 8), (112, 12), (224, 4), (224, 8), (224, 12)]
    for img, depth in settings:
        rrm, pixels = _random_vit_b(depth, img)
        t0 = time.perf_counter()
        graph = rrm.attribute(pixels, batch_size=32, max_feature_nodes=budget)
        dt = time.perf_counter() - t0
        n_rows = int((~torch.isnan(graph.value)).sum())
        rows.append([f"ViT-B/16 random, {depth} layers, {rrm.model.cfg.n_ctx} tokens", graph.n_nodes,
                     graph.node_kind.count("feature"), n_rows, f"{dt:.1f}", f"{dt / n_rows * 1e3:.0f}"])  # fmt: skip
    return rows


def matmul_gflops(n: int = 1536, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (median of ``repeats`` ``n × n`` products), GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(torch.tensor(times).median()) / 1e9


def part3_rows(n_rows: int, repeats: int = 2) -> list[object]:
    """Row-engine time only (``RowEngine.rows``), both engines on the same budget, interleaved."""
    from sae_vision_ext.circuits.engine import row_engine
    from sae_vision_ext.circuits.engine.attribution import Attributor
    from sae_vision_ext.circuits.engine.rows import row_macs

    rrm, pixels = _random_vit_b(12, 224)
    spent = {"staged": [], "autograd": []}
    original = row_engine.RowEngine.rows
    clock = {"t": 0.0}

    def timed(self, layer, idx):
        t0 = time.perf_counter()
        out = original(self, layer, idx)
        clock["t"] += time.perf_counter() - t0
        return out

    row_engine.RowEngine.rows = timed
    graphs = {}
    try:
        for _ in range(repeats):
            for engine in spent:
                clock["t"] = 0.0
                graphs[engine] = Attributor(rrm, batch_size=64, engine=engine).attribute(
                    pixels, max_feature_nodes=n_rows
                )
                spent[engine].append(clock["t"])
    finally:
        row_engine.RowEngine.rows = original
    rows = int((~torch.isnan(graphs["staged"].value)).sum())
    both = ~torch.isnan(graphs["staged"].value) & ~torch.isnan(graphs["autograd"].value)
    a, b = (graphs[e].adjacency.coalesce() for e in ("staged", "autograd"))
    diff = (a - b).coalesce()
    keep = both[diff.indices()[0]]
    worst = float(diff.values()[keep].abs().max())
    cfg = rrm.model.cfg
    macs = row_macs(cfg.n_ctx, cfg.d_model, cfg.d_mlp, cfg.n_heads, rrm.saes[0].cfg.k + 1)
    peak = matmul_gflops()
    floor_ms = 2 * macs / (peak * 1e9) * 1e3
    ours = min(spent["staged"]) / rows * 1e3
    plain = min(spent["autograd"]) / rows * 1e3
    return [
        f"ViT-B/16 random, 12 layers, 197 tokens, k 32, {rows} rows",
        f"{ours:.2f}",
        f"{plain:.1f}",
        f"{plain / ours:.1f}x",
        f"{2 * macs / 1e6:.1f} MFLOP -> {floor_ms:.3f} ms at {peak:.0f} GFLOP/s",
        f"{floor_ms / ours:.0%}",
        f"{worst:.1e}",
    ]


def part3_budget(n_nodes: int = 7500, repeats: int = 2) -> list[list[object]]:
    """A budgeted graph end to end: attribute (forwards, rows, influence), prune, circuit-tracer export."""
    import tempfile
    from pathlib import Path

    rrm, pixels = _random_vit_b(12, 224)
    out = Path(tempfile.mkdtemp())
    steps: dict[str, list[float]] = {"attribute": [], "prune": [], "to_json": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = rrm.attribute(pixels, batch_size=64, max_feature_nodes=n_nodes)
        t1 = time.perf_counter()
        pruned = graph.prune()
        t2 = time.perf_counter()
        pruned.to_json(out / "graph.json", rrm=rrm)
        t3 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            steps[k].append(v)
    med = {k: float(torch.tensor(v).median()) for k, v in steps.items()}
    total = sum(med.values())
    edges = graph.adjacency._nnz()
    return [
        [
            f"attribute ({n_nodes} feature rows + target, {graph.n_nodes} nodes)",
            f"{med['attribute']:.1f}",
            f"{edges} edges",
        ],
        ["prune (circuit-tracer's algorithm)", f"{med['prune']:.1f}", f"{int(pruned.node_mask.sum())} nodes kept"],
        ["to_json (circuit-tracer files)", f"{med['to_json']:.1f}", ""],
        ["total", f"{total:.1f}", f"target <= 15 s: {'met' if total <= 15 else 'NOT met'}"],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=int, default=48, help="targets sampled for the Jacobian baseline")
    p.add_argument("--budget", type=int, default=128, help="max_feature_nodes for part 2")
    p.add_argument("--rows-vit-b", type=int, default=512, help="max_feature_nodes for the ViT-B rows of part 1")
    p.add_argument("--quick", action="store_true", help="part 2 at 4 layers only")
    p.add_argument("--only-part3", action="store_true", help="issue 13's targets only")
    p.add_argument("--rows-floor", type=int, default=1024, help="budget of the row-engine comparison (part 3)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    header = ["graph", "staged ms/row", "autograd ms/row", "speed-up", "FLOP floor per row", "floor / staged"]
    header.append("max |edge diff|")
    print(markdown_table(header, [part3_rows(args.rows_floor)]) + "\n")
    print(markdown_table(["step", "median s", "size"], part3_budget()) + "\n")
    if args.only_part3:
        return
    header = ["graph", "rows", "ours ms/row", "jacrev ms/row", "speed-up", "max |edge diff|"]
    rrm, pixels = _shapes_rrm()
    rows = [part1("sve:shapes-vit + shipped SAEs, 6 layers, 65 tokens, all rows", rrm, pixels, args.targets, None)]
    for depth in (4, 12):
        rrm, pixels = _random_vit_b(depth, 224)
        name = f"ViT-B/16 random, {depth} layers, 197 tokens, {args.rows_vit_b} rows"
        rows.append(part1(name, rrm, pixels, 8, args.rows_vit_b))
    print(markdown_table(header, rows) + "\n")
    header = ["model", "nodes", "active features", "rows (budget + targets)", "graph s", "ms/row"]
    print(markdown_table(header, part2(args.budget, args.quick)))


if __name__ == "__main__":
    main()
