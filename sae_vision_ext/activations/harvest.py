"""Harvest activations for SAE training: every requested hook from one forward per image batch.

Token selection (positions are prefix tokens first, then patches row-major):

- ``all``: every token; ``patches``: patch tokens only; ``cls``: position 0 (needs a CLS token);
  ``prefix``: CLS, registers, distillation token; ``no_registers``: everything but register tokens.
- ``patches_per_image=k`` keeps a random ``k`` of the selected *patch* positions of each image
  (prefix tokens that the selection keeps are always kept).

NaFlex batches of images at their own sizes (a list of ``[chan, h, w]`` tensors per batch) are padded to
one sequence length; padding tokens (``HookedViT.token_mask`` False) are never harvested, so image ``i``
gives its prefix tokens and its own ``rows_i * cols_i`` patches (before any subsampling).

Tokens of one image are strongly correlated, so training reads them through :class:`ShuffleBuffer`,
which mixes tokens across many images. The same permutation applies to every hook, so row ``i``
of each hook's batch comes from the same token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from .._hooks import layer_of

if TYPE_CHECKING:
    from ..models.hooked_vit import HookedViT

TokenSelection = Literal["all", "patches", "cls", "prefix", "no_registers"]
TOKEN_SELECTIONS: tuple[str, ...] = get_args(TokenSelection)
_HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def resolve_hook_names(spec: str | Sequence[str], n_layers: int, layers: Sequence[int] | None = None) -> list[str]:
    """``"all_resid_post"`` (or ``all_<kind>`` for resid_pre/mid/post, attn_out, mlp_out) -> one name
    per layer (or per ``layers``); a single name or a list passes through."""
    if isinstance(spec, str) and spec.startswith("all_"):
        kind = spec.removeprefix("all_")
        if kind not in _HOOK_KINDS:
            raise ValueError(f"Unknown hook group {spec!r}; valid: {[f'all_{k}' for k in _HOOK_KINDS]}.")
        chosen = range(n_layers) if layers is None else layers
        bad = [layer for layer in chosen if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range for a {n_layers}-layer model.")
        return [f"blocks.{layer}.hook_{kind}" for layer in chosen]
    return [spec] if isinstance(spec, str) else list(spec)


def deepest_block(hook_names: Sequence[str]) -> int | None:
    """Index of the deepest block named, or ``None`` if any hook lies outside the blocks."""
    layers = [layer_of(name) for name in hook_names]
    if any(layer is None for layer in layers):
        return None
    return max(layers) if layers else None


def token_positions(n_prefix: int, has_cls: bool, n_registers: int, n_pos: int, selection: TokenSelection) -> Tensor:
    """Positions kept by ``selection`` for a sequence of ``n_pos`` tokens."""
    if selection not in TOKEN_SELECTIONS:
        raise ValueError(f"Unknown token_selection {selection!r}; valid: {TOKEN_SELECTIONS}.")
    pos = torch.arange(n_pos)
    if selection == "all":
        return pos
    if selection == "patches":
        return pos[n_prefix:]
    if selection == "cls":
        if not has_cls:
            raise ValueError("token_selection='cls' needs a model with a CLS token; this one has none.")
        return pos[:1]
    if selection == "prefix":
        if n_prefix == 0:
            raise ValueError("token_selection='prefix' needs prefix tokens; this model has none.")
        return pos[:n_prefix]
    reg = torch.arange(int(has_cls), int(has_cls) + n_registers)
    return pos[~torch.isin(pos, reg)]


def harvest(
    model: HookedViT,
    image_batches: Iterable[Tensor | Sequence[Tensor]],
    hook_names: Sequence[str],
    token_selection: TokenSelection = "all",
    patches_per_image: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, Tensor]]:
    """For each preprocessed image batch, ``{hook: [n_tokens, d]}`` from one forward pass.

    The forward stops after the deepest requested block (``stop_at_layer``); rows are ordered
    image by image, then by position. A batch may be a list of images of different sizes (NaFlex
    models); padding tokens are left out.
    """
    cfg = model.cfg
    for name in hook_names:
        model.check_hook_name(name)
    deepest = deepest_block(hook_names)
    stop = None if deepest is None else deepest + 1
    for pixels in image_batches:
        with torch.no_grad():
            _, cache = model.run_with_cache(
                pixels, names_filter=list(hook_names), stop_at_layer=stop, return_cache_object=False
            )
        n_pos = cache[hook_names[0]].shape[1]
        keep = token_positions(cfg.n_prefix_tokens, cfg.has_cls_token, cfg.n_registers, n_pos, token_selection)
        mask = harvest_mask(model.token_mask, keep)
        if patches_per_image is not None:
            mask = _subsample_patches(mask, keep, cfg.n_prefix_tokens, patches_per_image, generator)
        yield {name: cache[name][mask.to(cache[name].device)] for name in hook_names}


def collate_pixels(items: Sequence[Tensor | Sequence[Tensor]]) -> Tensor | list[Tensor]:
    """A ``DataLoader`` ``collate_fn`` for images (or ``(image, label, ...)`` items): one stacked batch
    when every image has the same size, else the list of images (a NaFlex model takes each at its own
    size; a fixed-grid model says to resize)."""
    images = [item if isinstance(item, Tensor) else item[0] for item in items]
    if len({tuple(t.shape) for t in images}) == 1:
        return torch.stack(images)
    return images


def to_device(pixels: Tensor | Sequence[Tensor], device: torch.device | str) -> Tensor | list[Tensor]:
    """A batch from :func:`collate_pixels` on ``device``."""
    return pixels.to(device) if isinstance(pixels, Tensor) else [t.to(device) for t in pixels]


def harvest_mask(token_mask: Tensor, keep: Tensor) -> Tensor:
    """``[batch, pos]`` bool: the positions ``keep`` selects that are real tokens of each image."""
    selected = torch.zeros(token_mask.shape[1], dtype=torch.bool, device=token_mask.device)
    selected[keep.to(token_mask.device)] = True
    return token_mask & selected


def _subsample_patches(mask: Tensor, keep: Tensor, n_prefix: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` random real patches per image among the selected ones (all of them when fewer); prefix
    tokens kept. One score per selected patch position, so fixed-size batches draw as they always have."""
    cols = keep[keep >= n_prefix].to(mask.device)
    if k >= len(cols):
        return mask
    scores = torch.rand((mask.shape[0], len(cols)), generator=generator)
    real = mask[:, cols].cpu()
    chosen = scores.masked_fill(~real, float("inf")).argsort(dim=1)[:, :k]
    ok = real.gather(1, chosen)
    rows = torch.arange(mask.shape[0])[:, None].expand(-1, k)
    out = mask.clone()
    out[:, cols] = False
    out[rows[ok].to(mask.device), cols[chosen.to(mask.device)][ok.to(mask.device)]] = True
    return out


class ShuffleBuffer:
    """Mixes tokens across images: fill to ``capacity`` tokens, shuffle, emit half as batches, refill.

    Emits ``{hook: [batch_size, d]}`` with the same permutation for every hook. A partial batch at
    the end of a finite stream is dropped.
    """

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator | None = None) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(f"capacity {capacity} must be at least twice batch_size {batch_size}.")
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator

    def __call__(self, stream: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        buffer: dict[str, Tensor] | None = None
        for chunk in stream:
            buffer = chunk if buffer is None else {k: torch.cat([buffer[k], v]) for k, v in chunk.items()}
            if next(iter(buffer.values())).shape[0] < self.capacity:
                continue
            perm = torch.randperm(next(iter(buffer.values())).shape[0], generator=self.generator)
            buffer = {k: v[perm] for k, v in buffer.items()}
            n_out = (next(iter(buffer.values())).shape[0] // 2) // self.batch_size * self.batch_size
            for i in range(0, n_out, self.batch_size):
                yield {k: v[i : i + self.batch_size] for k, v in buffer.items()}
            buffer = {k: v[n_out:] for k, v in buffer.items()}
        if buffer is not None:
            n = next(iter(buffer.values())).shape[0]
            perm = torch.randperm(n, generator=self.generator)
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                yield {k: v[perm[i : i + self.batch_size]] for k, v in buffer.items()}
