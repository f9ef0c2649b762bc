"""The row engine of ``Attributor``: for a batch of targets of one layer, their edge weights onto the
previous layer's sources, by the closed form of ``engine/rows.py`` or by batched VJPs, with the source
directions built once per image (and ``ln1``-folded once per block)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...saes import affine
from .rows import Sources, Workspace, block_rows, row_macs

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT
    from .attribution import Attributor, _Leaves


class RowEngine:
    """Rows of one traced image for an ``Attributor`` ``att`` (its ``model``, ``rrm``, ``engine``, ``mlp``;
    ``engine/attribution.py``'s module docstring): closed form through one block where a layer's
    block reads the previous SAE layer directly (``engine/rows.py``), plain batched VJPs elsewhere (logit
    targets, MLP-leaf mode, blocks between SAE layers) or everywhere with ``engine="autograd"``; both
    project on the same per-token source directions."""

    def __init__(
        self,
        att: Attributor,
        frozen: dict[str, Tensor],
        norms: list[affine.FrozenNorm],
        mids: dict[int, Tensor],
        leaves: _Leaves,
        *,
        seeds: list[Tensor],
    ) -> None:
        self.att, self.model, self.rrm = att, att.model, att.rrm
        self.frozen, self.norms, self.mids, self.leaves, self.seeds = frozen, norms, mids, leaves, seeds
        self.workspace = Workspace()
        self._folded: dict[int, Sources] = {}
        self._enc: dict[int, Tensor] = {}

    def set_sources(
        self,
        x_in: Tensor,
        src_pos: dict[int, Tensor],
        src_feat: dict[int, Tensor],
        acts: list[Tensor],
        errors: list[Tensor],
        *,
        src_nodes: dict[int, Tensor],
        mlp_nodes: dict[int, Tensor],
        mlp_out: list[Tensor],
    ) -> None:
        """Per source layer (``-1``: the inputs) the directions ``[T, K, d_model]`` each row is projected
        on (active features' effective decoder rows, then the error vector), which flattened slot each
        source node reads, its multiplier (the activation, or 1) and the source node ids."""
        n_pos, dev = x_in.shape[0], x_in.device
        self.n_pos, self.mlp_out = n_pos, mlp_out
        self.mlp_nodes = {layer: ids.to(dev) for layer, ids in mlp_nodes.items()}
        self.pos, self.feat = src_pos, src_feat
        every = torch.arange(n_pos, device=dev)
        self.sources = {-1: (x_in[:, None].detach(), every, None, every)}
        for layer, sae in enumerate(self.rrm.saes):
            pos, feat = src_pos[layer], src_feat[layer]
            counts = torch.bincount(pos, minlength=n_pos)
            slot = torch.arange(len(pos), device=dev) - (torch.cumsum(counts, 0) - counts)[pos]
            k = int(counts.max()) if len(pos) else 0
            dirs = torch.zeros(n_pos, k + 1, sae.cfg.d_in, dtype=errors[layer].dtype, device=dev)
            dirs[pos, slot] = affine.decoder_directions(sae, feat, self.norms[layer].select(pos)).detach()
            dirs[:, k] = errors[layer]
            sel = torch.cat([pos * (k + 1) + slot, every * (k + 1) + k])
            mult = torch.cat([acts[layer][pos, feat], torch.ones(n_pos, dtype=acts[layer].dtype, device=dev)])
            self.sources[layer] = (dirs, sel, mult, src_nodes[layer].to(dev))

    def _closed_form(self, layer: int) -> bool:
        rrm = self.rrm
        if self.att.engine == "autograd" or self.att.mlp or layer >= rrm.n_layers:
            return False
        return rrm.layers[layer] == (rrm.layers[layer - 1] + 1 if layer else 0)

    def rows(self, layer: int, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Edge weights ``[R, S]`` of the targets ``seeds[layer][idx]`` and their source node ids ``[S]``."""
        dirs, sel, mult, src = self.sources[layer - 1]
        mlp_w = None
        if self._closed_form(layer):
            block = self.rrm.layers[layer]
            if layer not in self._folded:
                self._folded[layer] = Sources.for_block(self.model, block, self.frozen, dirs)
                self._enc[layer] = affine.encoder_weights(self.rrm.saes[layer])[0].detach()
            pos, feat = self.pos[layer][idx, None], self.feat[layer][idx]  # one token per row, weight 1
            tokens = (pos, torch.ones(pos.shape, dtype=dirs.dtype, device=dirs.device))
            cols = self._enc[layer][:, feat].T
            proj, _ = block_rows(
                self.model,
                block,
                self.frozen,
                self.mids[layer],
                cols,
                norm=self.norms[layer],
                tokens=tokens,
                sources=self._folded[layer],
                workspace=self.workspace,
            )
        else:
            mlp = self.att.mlp and layer < self.rrm.n_layers
            inputs = [self.leaves.values[layer - 1]] + ([self.leaves.values[("mlp", layer)]] if mlp else [])
            onehot = torch.zeros(len(idx), len(self.seeds[layer]), dtype=self.seeds[layer].dtype, device=dirs.device)
            onehot[torch.arange(len(idx), device=dirs.device), idx] = 1.0
            grads = torch.autograd.grad(
                self.seeds[layer],
                inputs,
                grad_outputs=onehot,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            proj = torch.einsum("rpd,pkd->rpk", grads[0][:, 0].detach(), dirs)
            if mlp:
                gm = torch.zeros_like(grads[0][:, 0]) if grads[1] is None else grads[1][:, 0].detach()
                mlp_w = (gm * self.mlp_out[layer]).sum(-1)
        w = proj.reshape(len(idx), -1)[:, sel]
        w = w if mult is None else w * mult
        if mlp_w is not None:
            return torch.cat([w, mlp_w], 1), torch.cat([src, self.mlp_nodes[layer]])
        return w, src


ROW_EFFICIENCY = 0.2
"""Share of the float32 matmul rate the row engine reaches (``benchmarks/bench_attribution.py``: 20% of
the FLOP floor on the 2-core CPU), used for the time estimate."""


def matmul_rate(device: torch.device | str = "cpu", n: int = 768) -> float:
    """A quick float32 matmul rate on ``device`` (FLOP/s; a few ms)."""
    a = torch.randn(n, 4 * n, device=device)
    b = torch.randn(4 * n, n, device=device)
    a @ b  # warm-up
    t0 = time.perf_counter()
    (a @ b).sum().item()
    return 2 * n * n * 4 * n / max(time.perf_counter() - t0, 1e-9)


def estimate(model: HookedViT, n_rows: int, n_nodes: int, n_src: int, device: torch.device | str = "cpu") -> str:
    """What a graph will cost before it starts: row arithmetic (``rows.row_macs``), the time it takes at
    :data:`ROW_EFFICIENCY` of this device's matmul rate, and the memory of the stored rows and edges."""
    cfg = model.cfg
    macs = n_rows * row_macs(cfg.n_ctx, cfg.d_model, cfg.d_mlp, cfg.n_heads, n_src // max(cfg.n_ctx, 1))
    seconds = 2 * macs / (ROW_EFFICIENCY * matmul_rate(device))
    mem = n_rows * n_src * (4 + 4 + 4 + 16)  # weights, magnitudes, exported values (float32), int64 indices
    return (
        f"attribute(): {n_rows} rows over {n_nodes} nodes: about {2 * macs / 1e9:.1f} GFLOP of row arithmetic "
        f"(~{seconds:.0f} s here), {mem / 1e6:.0f} MB for the rows and edges."
    )
