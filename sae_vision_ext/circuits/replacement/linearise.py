"""Frozen linearisation of a HookedViT with SAEs spliced at every residual layer.

On a traced image the clean forward (all SAE error terms kept) is recorded; ``frozen_hooks`` then
returns, in any later forward, the *recorded* attention patterns, LayerNorm scales (ln_pre, ln1,
ln2, ln_final) and MLP gates (``act(u) = u · g(u)`` with ``g`` held at its recorded value: GELU
``Φ(u)``, GELU-tanh, QuickGELU ``σ(1.702u)``, ReLU ``1[u > 0]``, SiLU ``σ(u)``). A gated MLP (SwiGLU,
``act(u_gate) · u_lin``) has its whole gate ``act(u_gate)`` held, so it scales the linear branch; a
norm inside a block (EVA-02's sub-LN on the MLP's hidden activation, EVA-CLIP's norm on the
attention output) has its scale held like any other. Rotary embeddings act on queries and keys
only, which enter through the held pattern. With those held fixed every block is affine in its
input, so:

- on the traced image the frozen forward equals the clean forward;
- the residual after each layer's splice, ``x_l = Σ_f a_{l,p,f} W_dec^l[f] + b_dec^l + e_l[p]``, is
  made a gradient leaf (by the attribution engines, ``engine/attribution.py``), so a target at layer
  ``l + 1`` (or a logit, reading ``x_{L-1}``) has gradient only at its adjacent leaf;
- gradients do not flow through patterns, scales, gates, SAE encoders or error terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._hooks import block_hook, resid_post

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT


def gate(act_fn: str, pre: Tensor) -> Tensor:
    """``g(u)`` with ``act(u) = u · g(u)`` for the supported activations."""
    if act_fn == "gelu":
        return 0.5 * (1.0 + torch.erf(pre / 2**0.5))
    if act_fn == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre**3)))
    if act_fn == "quick_gelu":
        return torch.sigmoid(1.702 * pre)
    if act_fn == "relu":
        return (pre > 0).to(pre.dtype)
    if act_fn == "silu":
        return torch.sigmoid(pre)
    raise ValueError(f"Cannot linearise activation {act_fn!r}; supported: gelu, gelu_tanh, quick_gelu, relu, silu.")


def _gated(model: HookedViT, layer: int) -> bool:
    """Whether block ``layer``'s MLP is gated (it has ``mlp.hook_pre_linear``)."""
    return block_hook(layer, "mlp.hook_pre_linear") in model.hook_dict


def frozen_names(model: HookedViT) -> list[str]:
    """Hooks whose clean values are recorded: patterns, LayerNorm scales, MLP pre-activations."""
    return [
        n
        for n in model.hook_dict
        if n.endswith(("attn.hook_pattern", "hook_scale", "mlp.hook_pre")) and ".hook_sae_" not in n
    ]


@torch.no_grad()
def record(model: HookedViT, pixels: Tensor) -> dict[str, Tensor]:
    """The values to freeze, from the clean forward of ``pixels`` (one image: batch 1)."""
    _, cache = model.run_with_cache(pixels, names_filter=frozen_names(model), return_cache_object=False)
    return frozen_from_cache(model, cache)


def frozen_from_cache(model: HookedViT, cache: dict[str, Tensor]) -> dict[str, Tensor]:
    """The values to freeze from a cache holding (at least) ``frozen_names(model)`` of a clean forward."""
    names = frozen_names(model)
    gates = {}
    for layer in range(model.cfg.n_layers):
        pre = cache[block_hook(layer, "mlp.hook_pre")]
        # gated: the whole act(u_gate) scales u_lin; else act(u) = u · g(u) with g held
        value = model.blocks[layer].parts.act(pre) if _gated(model, layer) else gate(model.cfg.act_fn, pre)
        gates[block_hook(layer, "mlp.gate")] = value
    return {n: cache[n] for n in names if not n.endswith("hook_pre")} | gates


def frozen_hooks(model: HookedViT, frozen: dict[str, Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that hold patterns, scales and gates at ``frozen`` (broadcast over the batch)."""
    hooks: list[tuple[str, Callable]] = []
    for name, value in frozen.items():
        if name.endswith("gate"):
            post = name.replace("gate", "hook_post")
            hooks.append((post, _make_gate_hook(value)))
        else:
            hooks.append((name, lambda t, hook, v=value: v.expand_as(t)))
    return hooks


def _make_gate_hook(g: Tensor) -> Callable:
    def hook(post: Tensor, hook: Any) -> Tensor:
        # post = act(pre) (or act(pre) · pre_linear); the MLP's own hook_pre (hook_pre_linear) value of
        # this forward was stored on this point
        pre = hook.ctx.pop("pre")  # popped: no graph-holding tensor outlives the forward
        return pre * g.expand_as(pre)

    return hook


def pre_capture_hooks(model: HookedViT) -> list[tuple[str, Callable]]:
    """Store each MLP's pre-activation (a gated MLP's linear branch) on its ``hook_post`` point so the
    gate hook can read it."""
    hooks = []
    for layer in range(model.cfg.n_layers):
        post_point = model.hook_dict[block_hook(layer, "mlp.hook_post")]

        def capture(pre: Tensor, hook: Any, point: Any = post_point) -> Tensor:
            point.ctx["pre"] = pre
            return pre

        source = "mlp.hook_pre_linear" if _gated(model, layer) else "mlp.hook_pre"
        hooks.append((block_hook(layer, source), capture))
    return hooks


def resid_post_gradients(
    model: HookedViT, pixels: Tensor, objective: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's ``hook_resid_post`` and the gradient of ``objective(output)`` (a scalar) with respect
    to it, under the frozen linearisation of ``pixels``' own forward (no SAEs). The gradients are total
    effects through every later layer (zero probes are added to the residuals, so no path is cut):
    under freezing, changing ``resid_post_l`` by ``Δ`` changes the objective by exactly ``<grad, Δ>``.
    Returns ``(resid, grads)``, each ``[batch, pos, d_model]`` per layer."""
    n_layers = model.cfg.n_layers
    frozen = record(model, pixels)
    resid: dict[int, Tensor] = {}
    probes: list[Tensor] = []

    def add_probe(t: Tensor, hook: Any, layer: int) -> Tensor:
        resid[layer] = t.detach()
        probes.append(torch.zeros_like(t, requires_grad=True))
        return t + probes[-1]

    hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen)
    hooks += [(resid_post(layer), lambda t, hook, layer=layer: add_probe(t, hook, layer)) for layer in range(n_layers)]
    with model.hooks(fwd_hooks=hooks):
        out = model(pixels)
    grads = torch.autograd.grad(objective(out), probes)
    return [resid[layer] for layer in range(n_layers)], list(grads)
