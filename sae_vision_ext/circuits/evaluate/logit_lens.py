"""Logit lens of SAE features: what each feature's decoder direction does to the class logits.

For an SAE on ``blocks.{l}.hook_resid_post`` and a reference image, freeze the model at that
image (attention patterns, norm scales and MLP gates, ``replacement/linearise.py``; the SAE's input statistics
at the image's tokens, ``saes/affine.py``). Then

    effect[f, c] = Σ_p <∂(z_c − mean_c' z_c') / ∂x_l[p], d_f[p]>

is the exact change of the demeaned logit of class ``c`` when one unit of feature ``f``'s
activation is added at every token of layer ``l`` (``d_f[p]`` the effective decoder direction at
token ``p``: normalisation and decoder-norm rescaling included). After the last block this is the
direct path through the final norm and head. ``logit_lens`` averages it over reference images.

With ``directions`` (``[n, d_out]``, e.g. CLIP text embeddings of class-name prompts for a model
whose output is the image embedding) the objective ``c`` is ``<output, directions[c]>`` instead of
a demeaned logit: zero-shot labels for the features of embedding models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..._hooks import resid_post
from ...saes import affine
from ...vis.lens import top_bottom
from ..replacement.linearise import frozen_hooks, pre_capture_hooks, record

if TYPE_CHECKING:
    from sae_lens import SAE

    from ...models.hooked_vit import HookedViT

__all__ = ["logit_lens", "top_bottom"]


def _class_gradients(
    model: HookedViT, pixels: Tensor, layers: list[int], chunk: int, directions: Tensor | None = None
) -> tuple[dict, dict]:
    """Clean residuals and, per layer, the gradient of every demeaned class logit at it under the
    frozen linearisation of ``pixels`` (one image): ``[n_classes, pos, d_model]``."""
    frozen = record(model, pixels)
    resid, probes = {}, {}

    def probe(t: Tensor, hook: Any, layer: int) -> Tensor:
        resid[layer] = t.detach()[0]
        probes[layer] = torch.zeros_like(t, requires_grad=True)
        return t + probes[layer]

    hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen)
    hooks += [(resid_post(layer), lambda t, hook, layer=layer: probe(t, hook, layer)) for layer in layers]
    with model.hooks(fwd_hooks=hooks):
        out = model(pixels)
    n = out.shape[-1]
    if directions is None:
        rows_all = torch.eye(n, dtype=out.dtype, device=out.device) - 1.0 / n  # row c: d(z_c - mean z)/dz
    else:
        if directions.ndim != 2 or directions.shape[1] != n:
            raise ValueError(f"directions must be [n, {n}] (the output's width); got {tuple(directions.shape)}.")
        rows_all = directions.to(out.dtype)
    demeaned = rows_all
    grads: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    order = [probes[layer] for layer in layers]
    for start in range(0, len(demeaned), chunk):
        rows = demeaned[start : start + chunk, None, :]  # [chunk, 1, n]
        g = torch.autograd.grad(out, order, grad_outputs=rows, is_grads_batched=True, retain_graph=True)
        for layer, gl in zip(layers, g, strict=True):
            grads[layer].append(gl[:, 0].detach())
    return resid, {layer: torch.cat(v) for layer, v in grads.items()}


def logit_lens(
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Float[Tensor, "batch chan h w"],
    chunk: int = 64,
    directions: Float[Tensor, "n_dirs d_out"] | None = None,
) -> dict[str, Float[Tensor, "d_sae n_classes"]]:
    """``{hook_name: effect}`` with ``effect[f, c]`` as in the module docstring, averaged over the
    images of ``pixels`` (``directions``: output directions instead of demeaned class logits). Every
    SAE must sit on a ``blocks.{l}.hook_resid_post`` of ``model``."""
    layers = []
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        parts = hook.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post" or not parts[1].isdigit():
            raise ValueError(f"logit_lens reads SAEs on blocks.<l>.hook_resid_post; got {hook!r}.")
        affine.check_linearisable(sae, "the logit lens")
        layers.append(int(parts[1]))
    if len(pixels) == 0:
        raise ValueError("logit_lens needs at least one reference image; got an empty batch.")
    totals: dict[str, Tensor] = {}
    for i in range(len(pixels)):
        resid, grads = _class_gradients(model, pixels[i : i + 1], sorted(set(layers)), chunk, directions)
        for sae, layer in zip(saes, layers, strict=True):
            with torch.no_grad():
                norm = affine.frozen_norm(sae, resid[layer])
                proj = affine.decoder_projection(sae, grads[layer], norm)  # [n_classes, pos, d_sae]
                effect = proj.sum(1).T.double()
            hook = sae.cfg.metadata.hook_name
            totals[hook] = totals.get(hook, 0) + effect
    return {hook: (t / len(pixels)).float() for hook, t in totals.items()}
