"""The seed paper's token-aggregated graph: ``rrm.attribute_aggregated`` against a baseline written as
the authors compute it (rubato-yeong/RRM ``utils/modules/modelgrad.py``,
``compute_node_and_edge_with_leaf_error_attributions``), same model, SAEs, image and references.

Baseline: the last SAE layer's gradient by one backward; then, per layer pair, one
``torch.func.jacrev`` of the gradient-weighted, token-summed next-layer TopK activations
(``Σ_T topk(relu(h)) ⊙ grad``, the "gradient trick") with respect to the block input, an ``[F, T, D]``
Jacobian; edges ``(J @ W_dec^T)·σ`` weighted by ``(z − m)`` and summed over tokens. The blocks are
frozen as in the authors' modules (attention weights, LayerNorm std, GELU gate) through this
package's frozen hooks. ``jacrev`` is a vmap over one-hot cotangents of one VJP; the baseline runs
exactly those VJPs in chunks of ``--chunk`` (``autograd.grad(..., is_grads_batched=True)``) after one
forward, because ``torch.func.jacrev`` over all ``F`` outputs, as the authors call it, grew past this
machine's 24 GB at ViT-B widths (with or without ``chunk_size``); the projection runs in chunks of
rows. Neither changes the arithmetic of a row. Reported: seconds per image, speed-up, and the
largest difference between the two results (edges and relevances).

Models: the issue's measurement setting (6 blocks, d_model 192, 197 tokens, F 384, k 32) and a
ViT-B/16-sized random timm model (d_model 768, 12 heads, 197 tokens) with SAEs on blocks
``0..depth-2`` taking the seed paper's per-layer k and widths from its layer ``--first`` on (default:
one layer pair, the paper's layers 5 → 6, 1,536 → 3,072 features, k 128; every pair of the paper's
12-block model costs about the same per row, so the ratio carries over). ``--full-vit`` adds the
paper's whole model (12 blocks, SAEs on 0-10 with its k and widths: 19,584 target rows for the
baseline, about 20 minutes here), timing the baseline on ``--sample`` random rows per layer pair and
scaling to all rows (each is the same VJP and projection); its sums over rows come from one VJP with a
cotangent of ones, and the sampled rows and every relevance are compared with ours.

    python -m benchmarks.bench_paper_graph [--depth 3] [--first 5] [--chunk 256] [--quick] [--full-vit]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._timing import markdown_table

PAPER_VIT = [
    (4, 0.25),
    (32, 0.5),
    (64, 1),
    (96, 2),
    (96, 2),
    (128, 2),
    (128, 4),
    (160, 4),
    (160, 4),
    (160, 4),
    (128, 2),
]
"""The seed paper's ``(k, width / d_model)`` for ViT-B/16 blocks 0-10 (its ``load_default_sae_configs``)."""


def build(d_model: int, depth: int, configs: list[tuple[int, float]], img: int = 224, seed: int = 0):
    """A random timm ViT (patch 16, ``d_model / 64`` heads) and layer_norm TopK SAEs on blocks
    ``0..len(configs)-1`` (unit-norm decoder rows, as the authors train them)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    import sae_vision_ext as sve
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    torch.manual_seed(seed)
    model = sve.HookedViT.from_pretrained(
        "timm:vit_base_patch16_224",
        pretrained=False,
        depth=depth,
        img_size=img,
        embed_dim=d_model,
        num_heads=max(1, d_model // 64),
    )
    saes = []
    for layer, (k, ratio) in enumerate(configs):
        cfg = TopKSAEConfig(
            d_in=d_model,
            d_sae=int(ratio * d_model),
            k=k,
            normalize_activations="layer_norm",
            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"),
        )
        sae = TopKSAE(cfg)
        with torch.no_grad():
            sae.W_enc.normal_(0, d_model**-0.5)
            sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_enc.T.clone(), dim=-1))
            sae.b_dec.normal_(0, 0.05)
        saes.append(sae)
    return ResidualReplacementModel(model, saes), torch.randn(1, 3, img, img)


def authors_graph(rrm, pixels, refs, err_refs, chunk: int, sample: int | None = None):
    """``(relevances, edges, seconds, sampled rows)`` in ``AggregatedGraph``'s layout, computed the authors'
    way (module docstring). With ``sample``, only that many random target rows per layer pair are
    computed and their time is scaled to all rows (each row is the same VJP and projection); the sum
    over rows that the next pair needs comes from one VJP with a cotangent of ones."""
    from sae_vision_ext.circuits.engine.attribution import Attributor, _Leaves
    from sae_vision_ext.circuits.replacement.linearise import frozen_hooks, pre_capture_hooks
    from sae_vision_ext.saes import affine

    model, n = rrm.model, rrm.n_layers
    frozen, norms = rrm.frozen_state(pixels)
    hooks = [s.cfg.metadata.hook_name for s in rrm.saes]
    with torch.no_grad():
        out, cache = model.run_with_cache_with_saes(
            pixels,
            saes=rrm.saes,
            use_error_term=True,
            return_cache_object=False,
            names_filter=[f"{h}.hook_sae_{k}" for h in hooks for k in ("input", "acts_post", "error")],
        )
    x_in = [cache[f"{h}.hook_sae_input"][0] for h in hooks]
    z = [cache[f"{h}.hook_sae_acts_post"][0] for h in hooks]
    err = [cache[f"{h}.hook_sae_error"][0] - r for h, r in zip(hooks, err_refs, strict=True)]
    dz = [a - r for a, r in zip(z, refs, strict=True)]
    direction = -torch.full((out.shape[-1],), 1.0 / out.shape[-1])
    direction[int(out[0].argmax())] += 1
    leaves = _Leaves(n)
    o, _ = Attributor(rrm)._forward(pixels, frozen, leaves, norms)
    (g,) = torch.autograd.grad(o[0] @ direction, leaves.values[n - 1])
    std = [nm.out_scale for nm in norms]  # x_std [T, 1]
    sae_grad = [None] * n
    sae_grad[n - 1] = (std[n - 1] * g[0]) @ rrm.saes[n - 1].W_dec.detach().T  # their get_grad
    rel = [None] * n
    rel[n - 1] = torch.cat([(sae_grad[n - 1] * dz[n - 1]).sum(0), (g[0] * err[n - 1]).sum()[None]])
    edges = [None] * n
    edges[n - 1] = rel[n - 1][None]
    timing: list[float] = []
    sampled: list[torch.Tensor | None] = [None] * n
    gen = torch.Generator().manual_seed(0)
    for i in range(n - 2, -1, -1):
        nxt = rrm.saes[i + 1]
        blocks = [model.blocks[b] for b in range(rrm.layers[i] + 1, rrm.layers[i + 1] + 1)]

        def layerwise(x: torch.Tensor, nxt=nxt, blocks=blocks, i=i) -> torch.Tensor:
            with model.hooks(fwd_hooks=pre_capture_hooks(model) + frozen_hooks(model, frozen)):
                for block in blocks:
                    x = block(x)
            acts = nxt.activation_fn(affine.pre_acts(nxt, x[0], norms[i + 1]))  # topk(relu((x−μ)/σ* − b_dec) W)
            return (acts * sae_grad[i + 1]).sum(0)  # [F] (gradient trick, token sum)

        # jacrev is vmap over one-hot cotangents of a VJP; the same VJPs, chunked with
        # is_grads_batched, keep the memory bounded (torch.func.jacrev over all F outputs, as the
        # authors call it, grew past this machine's 24 GB at ViT-B widths, with or without chunk_size)
        x = x_in[i][None].clone().requires_grad_()
        t0 = time.perf_counter()
        f_out = layerwise(x)
        forward_s = time.perf_counter() - t0
        n_out = len(f_out)
        picked = torch.arange(n_out) if sample is None else torch.randperm(n_out, generator=gen)[:sample].sort().values
        t0 = time.perf_counter()
        eye = torch.eye(n_out, dtype=f_out.dtype)
        jac = torch.cat(
            [
                torch.autograd.grad(f_out, x, grad_outputs=eye[cols], is_grads_batched=True, retain_graph=True)[0][:, 0]
                for cols in picked.split(chunk)
            ]
        )  # [rows, T, D]
        w_dec = rrm.saes[i].W_dec.detach()
        e = torch.zeros(nxt.cfg.d_sae + 1, rrm.saes[i].cfg.d_sae + 1)
        grad_i = torch.zeros_like(sae_grad[i + 1][:, :1].expand(-1, rrm.saes[i].cfg.d_sae)).clone()
        for start in range(0, len(jac), chunk):  # edge = (J @ W_dec^T) * x_std, in chunks of rows
            part = (jac[start : start + chunk] @ w_dec.T) * std[i][None]  # [rows, T, Fi]
            grad_i += part.sum(0)
            rows = picked[start : start + chunk]  # the error target's row (last) stays zero
            e[rows, :-1] = (part * dz[i][None]).sum(1)
            e[rows, -1] = (jac[start : start + chunk] * err[i][None]).sum((1, 2))
        rows_s = time.perf_counter() - t0
        timing.append(forward_s + rows_s * n_out / len(picked))  # rows cost the same VJP each
        if sample is not None:  # the sum over all rows (needed by the next pair) by one VJP with ones
            (j_sum,) = torch.autograd.grad(f_out, x, grad_outputs=torch.ones_like(f_out), retain_graph=True)
            grad_i = (j_sum[0] @ w_dec.T) * std[i]
            e_err = (j_sum[0] * err[i]).sum()
        else:
            e_err = e[:-1, -1].sum()
        sae_grad[i] = grad_i
        rel[i] = torch.cat([(grad_i * dz[i]).sum(0), e_err[None]])
        edges[i] = e
        sampled[i] = picked
    return rel, edges, timing, sampled


def compare(name: str, rrm, pixels, chunk: int, sample: int | None = None) -> list[object]:
    refs = rrm.reference_values(pixels, "median")  # one image: its own values; any reference does
    refs = [torch.zeros_like(r) if i % 2 else r * 0.5 for i, r in enumerate(refs)]  # non-trivial (z − m)
    err_refs = [torch.zeros_like(e) for e in rrm.reference_values(pixels, "zero", of="errors")]
    t0 = time.perf_counter()
    ours = rrm.attribute_aggregated(pixels, refs, err_refs, batch_size=64)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    rel, edges, timing, sampled = authors_graph(rrm, pixels, refs, err_refs, chunk, sample)
    t_base = time.perf_counter() - t0 if sample is None else sum(timing)
    pairs = [*zip(ours.relevance, rel, strict=True), (ours.edges[-1], edges[-1])]
    for i, rows in enumerate(sampled[:-1]):  # the rows the baseline computed
        pairs.append((ours.edges[i][rows], edges[i][rows]))
    diff = max(float((a - b.detach().double()).abs().max()) for a, b in pairs)
    scale = max(float(a.abs().max()) for a, _ in pairs)
    how = "" if sample is None else f" ({sample} rows per pair timed, scaled to all)"
    return [name, f"{t_base:.1f}{how}", f"{t_ours:.1f}", f"{t_base / t_ours:.1f}x", f"{diff / scale:.1e}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=3, help="blocks of the ViT-B-sized model (SAEs on 0..depth-2)")
    p.add_argument("--chunk", type=int, default=256, help="jacrev chunk_size and projection chunk of the baseline")
    p.add_argument("--first", type=int, default=5, help="paper layer whose (k, width) the first SAE takes")
    p.add_argument("--quick", action="store_true", help="the small setting only")
    p.add_argument(
        "--full-vit",
        action="store_true",
        help="also the paper's whole ViT-B/16 (12 blocks, SAEs on 0-10 with its k and widths); the baseline "
        "is timed on --sample rows per layer pair and scaled",
    )
    p.add_argument("--sample", type=int, default=384, help="baseline rows timed per layer pair with --full-vit")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    header = [
        "model",
        "authors' jacrev s/image",
        "ours s/image",
        "speed-up",
        "max |diff| / max |value| (edges, relevances)",
    ]
    rows = [
        compare(
            "6 blocks, d_model 192, 197 tokens, F 384, k 32 (SAEs on 0-4)", *build(192, 6, [(32, 2)] * 5), args.chunk
        )
    ]
    if not args.quick:
        configs = PAPER_VIT[args.first : args.first + args.depth - 1]
        name = (
            f"ViT-B/16 size, {args.depth} blocks, 197 tokens, SAEs on 0-{args.depth - 2} with the paper's k "
            f"and widths of its layers {args.first}-{args.first + len(configs) - 1}"
        )
        rows.append(compare(name, *build(768, args.depth, configs), args.chunk))
    if args.full_vit:
        name = "ViT-B/16 size, 12 blocks, 197 tokens, SAEs on 0-10 with the paper's k and widths (all 11 layers)"
        rows.append(compare(name, *build(768, 12, PAPER_VIT), args.chunk, args.sample))
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
