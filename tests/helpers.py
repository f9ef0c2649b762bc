"""Shared test helpers (one module, imported by conftest and the tests): tiny seeded models of every
supported variant (``VARIANTS`` maps a variant id to ``(adapter name, builder)``; builders return the
*native* module in eval mode; every registered adapter must have at least one variant), images, random
SAEs of every SAELens class, replacement models, the exactness check, circuit-tracer's modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import nn

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor, _Leaves
from sae_vision_ext.circuits.models import ResidualReplacementModel

IMG, PATCH, D, HEADS, LAYERS = 32, 8, 32, 4, 2


def _timm(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    base = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS, num_classes=5,
                qkv_bias=True)  # fmt: skip
    return VisionTransformer(**(base | kw))


def _timm_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS,
                                      num_classes=5)  # fmt: skip


def _timm_eva(name: str, **kw) -> nn.Module:
    """A tiny random timm ``Eva`` built by timm's own constructor for ``name`` (its architecture flags kept)."""
    import timm

    base = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS,
                num_classes=5)  # fmt: skip
    return timm.create_model(name, **(base | kw))


def _timm_naflex(name: str, **kw) -> nn.Module:
    """A tiny random timm ``NaFlexVit`` built by timm's own constructor for ``name`` (a 4x4 position table)."""
    import timm

    base = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS,
                num_classes=5, pos_embed_grid_size=(IMG // PATCH, IMG // PATCH))  # fmt: skip
    return timm.create_model(name, **(base | kw))


def _open_clip(**kw) -> nn.Module:
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    base = dict(image_size=IMG, patch_size=PATCH, width=D, layers=LAYERS, heads=HEADS, mlp_ratio=2.0,
                output_dim=16, act_layer=QuickGELU)  # fmt: skip
    return VisionTransformer(**(base | kw))


def _open_clip_timm() -> nn.Module:
    from open_clip.timm_model import TimmModel

    tower = TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=IMG, pool="", proj="linear")
    tower.trunk = _timm(class_token=False, global_pool="map", num_classes=0, no_embed_class=True)
    tower.head.proj = nn.Linear(D, 16, bias=False)
    return tower


def _open_clip_timm_eva() -> nn.Module:
    """An open_clip TimmModel tower (EVA-CLIP style) with a tiny EVA-02 trunk and a linear projection."""
    from open_clip.timm_model import TimmModel

    tower = TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=IMG, pool="", proj="linear")
    tower.trunk = _timm_eva("eva02_tiny_patch14_224", num_classes=0)
    tower.head.proj = nn.Linear(D, 16, bias=False)
    return tower


def _open_clip_full_clip() -> nn.Module:
    from open_clip.model import CLIP

    vision = dict(image_size=IMG, patch_size=PATCH, width=D, layers=LAYERS, head_width=D // HEADS, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=D, heads=HEADS, layers=1)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    common = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=IMG,
                  patch_size=PATCH)  # fmt: skip
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(intermediate_size=64, **common))
    if kind == "vit_cls":
        return tf.ViTForImageClassification(tf.ViTConfig(intermediate_size=64, num_labels=5, **common))
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **common))
    if kind == "clip_proj":
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **common))
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **common))
    if kind == "dinov2_reg":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=3, layerscale_value=0.5, **common)
        return tf.Dinov2WithRegistersModel(cfg)
    if kind == "dinov2_cls":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, num_labels=5, **common)
        return tf.Dinov2WithRegistersForImageClassification(cfg)
    if kind == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64, **common))
    if kind in _HF_2026:
        return _HF_2026[kind](tf, common)
    raise ValueError(kind)


_HF_2026 = {
    "dinov3": lambda tf, common: tf.DINOv3ViTModel(
        tf.DINOv3ViTConfig(intermediate_size=64, num_register_tokens=2, layerscale_value=0.5, **common)
    ),
    "dinov3_gated": lambda tf, common: tf.DINOv3ViTModel(
        tf.DINOv3ViTConfig(intermediate_size=64, num_register_tokens=0, use_gated_mlp=True, hidden_act="silu", **common)
    ),
    "aimv2": lambda tf, common: tf.Aimv2VisionModel(
        tf.Aimv2VisionConfig(intermediate_size=64, use_head=False, **common)
    ),
    "siglip2": lambda tf, common: tf.Siglip2VisionModel(_siglip2_config(tf, common, vision_use_head=True)),
    "siglip2_mean": lambda tf, common: tf.Siglip2VisionModel(_siglip2_config(tf, common, vision_use_head=False)),
    "aimv2_native_head": lambda tf, common: tf.Aimv2VisionModel(
        tf.Aimv2VisionConfig(intermediate_size=64, use_head=True, is_native=True, **common)
    ),
}
"""HF builders of the 2026 backbones (DINOv3, AIMv2) from their config classes, tiny and random."""


def _siglip2_config(tf, common: dict, **kw):
    """SigLIP 2 (NaFlex) has no image size: a position table of (IMG / PATCH)^2 entries instead."""
    common = {k: v for k, v in common.items() if k != "image_size"}
    return tf.Siglip2VisionConfig(intermediate_size=64, num_patches=(IMG // PATCH) ** 2, **common, **kw)


def build_native(variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = VARIANTS[variant][1]().eval()
    with torch.no_grad():  # sharp attention and non-trivial tokens, biases and scales (inits are near-degenerate)
        for name, p in module.named_parameters():
            if p.ndim <= 1 or "token" in name or "embed" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return module


def images(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def one_per_adapter() -> list[str]:
    seen: dict[str, str] = {}
    for vid, (adapter, _) in VARIANTS.items():
        seen.setdefault(adapter, vid)
    return list(seen.values())


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def rrm_for(variant: str):
    """A float64 residual replacement model: the variant with a random TopK SAE (d_sae 48, k 5) per layer."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext import HookedViT
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    model = HookedViT.from_model(build_native(variant)).double()
    saes = []
    for layer in range(model.cfg.n_layers):
        torch.manual_seed(layer)
        meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=5, dtype="float64", metadata=meta))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.4)
            sae.b_dec.normal_(0, 0.1)
        saes.append(sae.double())
    return ResidualReplacementModel(model, saes)


def launch_chromium(playwright):
    """Debian's chromium through Playwright; fails loudly (never skips) when it is not installed."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "BROWSER TEST NOT RUN: Debian's chromium is not installed. Install it with "
            "`apt-get install -y chromium` (as .ci/run does) so pages are checked in a real browser."
        )
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)


ARCHS = ["standard", "topk", "topk_rescale", "jumprelu", "gated", "signed_topk", "abstopk"]


NORMS = ["none", "layer_norm", "constant_norm_rescale", "expected_average_only_in"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests listen on loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sae(arch: str, norm: str, apply_b_dec: bool, d_in: int = 32, d_sae: int = 40, seed: int = 0, hook: str = ""):
    """A random float64 SAELens SAE of ``arch`` with non-unit decoder rows, random biases and, for
    JumpReLU, random positive thresholds."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext.saes.signed_topk import SignedTopKSAE, SignedTopKSAEConfig

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 5}),
        "topk_rescale": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
        "signed_topk": (SignedTopKSAE, SignedTopKSAEConfig, {"k": 5}),
        "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig, {"k": 5}),
    }
    cls, cfg_cls, extra = classes[arch]
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float64",
        normalize_activations=norm,
        apply_b_dec_to_input=apply_b_dec,
        metadata=SAEMetadata(hook_name=hook),
        **extra,
    )
    sae = cls(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = {"W_dec": 1.0, "W_enc": 0.4, "threshold": 0.0}.get(name, 0.1)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g, dtype=torch.float64) * 2.5 + 0.2)  # rows far from unit
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(d_sae, generator=g, dtype=torch.float64) * 0.3)
    return sae


def rrm_with(variant: str, arch: str, norm: str, apply_b_dec: bool) -> ResidualReplacementModel:
    model = HookedViT.from_model(build_native(variant)).double()
    saes = [
        make_sae(arch, norm, apply_b_dec, d_in=model.cfg.d_model, seed=layer, hook=f"blocks.{layer}.hook_resid_post")
        for layer in range(model.cfg.n_layers)
    ]
    return ResidualReplacementModel(model, saes)


def check_exact(rrm: ResidualReplacementModel, x: torch.Tensor, n_sources: int = 3) -> int:
    """Sum rule, frozen interventions = Δ/a·edge on the next layer (and the output for the last
    layer), second derivatives zero. Returns how many (source, target) pairs were checked."""
    g = Attributor(rrm, batch_size=8).attribute(x)
    rows = ~torch.isnan(g.value)
    A = g.dense()
    torch.testing.assert_close(A[rows].sum(1) + g.constant[rows], g.value[rows], atol=1e-8, rtol=1e-8)
    checked = 0
    for slot, layer in enumerate(rrm.layers):
        sources = [i for i, k in enumerate(g.node_kind) if k == "feature" and g.node_layer[i] == layer][:n_sources]
        after = rrm.layers[slot + 1] if slot + 1 < rrm.n_layers else rrm.model.cfg.n_layers
        for s in sources:
            p, f, a = int(g.node_pos[s]), int(g.node_feature[s]), float(g.activation[s])
            delta = 0.37 * abs(a) + 0.05
            base = rrm.intervene(x, [(layer, p, f, a)], freeze=True)
            moved = rrm.intervene(x, [(layer, p, f, a + delta)], freeze=True)
            for t in torch.nonzero(g.node_layer == after).flatten().tolist():
                if g.node_kind[t] == "feature":
                    pt, ft = int(g.node_pos[t]), int(g.node_feature[t])
                    before, now = base["feature_pre_acts"][slot + 1], moved["feature_pre_acts"][slot + 1]
                    change = now[0, pt, ft] - before[0, pt, ft]
                elif g.node_kind[t] == "target":
                    direction = torch.zeros(moved["output"].shape[-1], dtype=torch.float64)
                    c = g.target_classes[0]
                    direction -= 1 / len(direction)
                    direction[c] += 1
                    change = (moved["output"][0] - base["output"][0]) @ direction
                else:
                    continue
                expected = delta / a * float(A[t, s])
                assert abs(float(change) - expected) < 1e-9 * max(1.0, abs(expected)), (layer, s, t)
                checked += 1
    att = Attributor(rrm)
    frozen, norms = rrm.frozen_state(x)
    leaves = _Leaves(rrm.n_layers)
    out, pre = att._forward(x, frozen, leaves, norms)
    downstream = pre[1][0].sum() if rrm.n_layers > 1 else out.sum()
    (grad,) = torch.autograd.grad(downstream, leaves.values[0], create_graph=True)
    second = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), leaves.values[0], allow_unused=True)[0]
    assert second is None or second.abs().max() == 0
    return checked


FAMILIES = ["timm_cls", "open_clip_tok", "hf_vit_classifier", "hf_clip", "hf_dinov2", "timm_eva02_clip_subln",
            "hf_dinov3", "hf_aimv2", "open_clip_timm_eva02", "hf_siglip2_mean", "timm_naflex_gap"]  # fmt: skip
"""One variant per adapter family with an affine readout (``test_every_adapter_family_has_a_traceable_variant``)."""


HOOK = "blocks.0.hook_resid_post"


def identity_sae(d: int, hook: str = HOOK) -> StandardSAE:
    """ReLU(x) - ReLU(-x) = x: a perfect 2d-feature SAE."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=hook)))  # fmt: skip
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


D_IN = 32


def write_rrm(root, model="vit", k=4, ratio=0.5, layer=0, epochs=(5, 50, 100), seed=0, b_enc_scale=0.0, d_in=D_IN):
    """``{root}/{model}/K{k}_R{R}/L{layer}/epoch{N}.pth`` with ``{"epoch", "model_state_dict",
    "optimizer_state_dict"}`` (an Adam state dict, as torch.optim writes it). Returns the state of the
    largest epoch."""
    folder = root / model / f"K{k}_R{ratio:g}" / f"L{layer}"
    folder.mkdir(parents=True, exist_ok=True)
    n = int(ratio * d_in)
    for epoch in epochs:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        w_enc = torch.randn(d_in, n, generator=g)
        state = {
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
            "b_enc": torch.randn(n, generator=g) * b_enc_scale,
            "W_enc": w_enc,
            "W_dec": torch.nn.functional.normalize(w_enc.T.clone(), dim=-1),
        }
        params = [torch.nn.Parameter(t.clone()) for t in state.values()]
        opt = torch.optim.Adam(params, lr=2e-4)
        sum(p.sum() for p in params).backward()
        opt.step()
        torch.save(
            {"epoch": epoch, "model_state_dict": state, "optimizer_state_dict": opt.state_dict()},
            folder / f"epoch{epoch}.pth",
        )
    return state


def _circuit_tracer():
    """circuit-tracer's modules; an ImportError fails the test with the README's install line."""
    try:
        from circuit_tracer.frontend import feature_models, graph_models
        from circuit_tracer.graph import Graph, prune_graph
        from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

        cgf = importlib.import_module(
            "circuit_tracer.utils.create_graph_files"
        )  # the package re-exports a function of that name
    except ImportError as e:  # pragma: no cover - the set-up is the README's test command
        raise AssertionError(
            "circuit-tracer is part of the test set-up: pip install --no-deps circuit-tracer==0.5.0"
        ) from e
    return graph_models, feature_models, Graph, prune_graph, cgf, UnifiedConfig


def to_circuit_tracer_graph(graph):
    """Our graph as circuit-tracer's ``Graph``: nodes reordered to [features, errors (layer-major),
    tokens, logits], the dense adjacency, one config "layer" per SAE layer. Returns the graph and
    our node index of each of its nodes."""
    _, _, Graph, _, _, UnifiedConfig = _circuit_tracer()
    kinds = graph.node_kind
    order = {k: [i for i, kk in enumerate(kinds) if kk == k] for k in ("feature", "error", "input", "target")}
    assert "mlp" not in kinds, "circuit-tracer has no MLP nodes"
    sae_layers = sorted({int(graph.node_layer[i]) for i in order["error"]})
    order["error"].sort(key=lambda i: (int(graph.node_layer[i]), int(graph.node_pos[i])))
    perm = torch.tensor(order["feature"] + order["error"] + order["input"] + order["target"])
    dense = graph.dense()[perm][:, perm]
    slot = {b: s for s, b in enumerate(sae_layers)}
    feats = torch.tensor(order["feature"], dtype=torch.long)
    active = torch.stack(
        [
            torch.tensor([slot[int(b)] for b in graph.node_layer[feats]], dtype=torch.long),
            graph.node_pos[feats],
            graph.node_feature[feats],
        ],
        1,
    )
    cfg = UnifiedConfig(
        n_layers=len(sae_layers),
        d_model=8,
        d_head=2,
        n_heads=4,
        d_mlp=8,
        d_vocab=max(graph.target_classes) + 1,
        tokenizer_name="none",
        model_name="vit",
        original_architecture="vit",
    )
    from circuit_tracer.attribution.targets import LogitTarget

    ct = Graph(
        input_string="image",
        input_tokens=torch.arange(len(order["input"])),
        active_features=active,
        adjacency_matrix=dense,
        cfg=cfg,
        selected_features=torch.arange(len(feats)),
        activation_values=graph.activation[feats],
        logit_targets=[
            LogitTarget(token_str=n, vocab_idx=c) for n, c in zip(graph.target_names, graph.target_classes, strict=True)
        ],
        logit_probabilities=graph.weights[order["target"]],
        scan="test",
    )
    return ct, perm, sae_layers


class _Tokenizer:
    def decode(self, t):
        return str(int(t))


VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "timm_cls": ("timm", lambda: _timm()),
    "timm_avg_no_cls": ("timm", lambda: _timm(class_token=False, global_pool="avg")),
    "timm_registers": ("timm", lambda: _timm(reg_tokens=3, no_embed_class=True)),
    "timm_layerscale_deit3": ("timm", lambda: _timm(init_values=0.3, no_embed_class=True)),
    "timm_pre_norm_clip": ("timm", lambda: _timm(pre_norm=True, act_layer="quick_gelu")),
    "timm_fc_norm_avg": ("timm", lambda: _timm(global_pool="avg", fc_norm=True)),
    "timm_map_siglip": ("timm", lambda: _timm(class_token=False, global_pool="map", no_embed_class=True)),
    "timm_qk_norm": ("timm", lambda: _timm(qk_norm=True)),
    "timm_distilled": ("timm", _timm_distilled),
    "timm_dynamic_size": ("timm", lambda: _timm(dynamic_img_size=True)),
    # EVA-CLIP: SwiGLU with sub-LN, norm on the attention output, separate q/k/v, RoPE, CLS pooling
    "timm_eva02_clip_subln": ("timm_eva", lambda: _timm_eva("eva02_base_patch16_clip_224")),
    # EVA-02: packed SwiGLU, RoPE, fused qkv with q/v biases, avg pool + fc_norm
    "timm_eva02_swiglu": ("timm_eva", lambda: _timm_eva("eva02_tiny_patch14_224")),
    # DINOv3: RoPE (dinov3), registers, LayerScale, no absolute position embedding, dynamic size
    "timm_dinov3": ("timm_eva", lambda: _timm_eva("vit_small_patch16_dinov3", num_reg_tokens=2)),
    # Perception Encoder core: AttentionRope, norm_pre, attention-pool head
    "timm_pe_core": ("timm_eva", lambda: _timm_eva("vit_pe_core_tiny_patch16_384")),
    "open_clip_tok": ("open_clip", lambda: _open_clip()),
    "open_clip_avg_ln_after_pool_ls": (
        "open_clip",
        lambda: _open_clip(pool_type="avg", final_ln_after_pool=True, ls_init_value=0.3),
    ),
    "open_clip_no_ln_pre_gelu": ("open_clip", lambda: _open_clip(no_ln_pre=True, act_layer=nn.GELU)),
    "open_clip_full_clip": ("open_clip", _open_clip_full_clip),
    "open_clip_timm_siglip": ("open_clip_timm", _open_clip_timm),
    "open_clip_timm_eva02": ("open_clip_timm_eva", _open_clip_timm_eva),
    "hf_vit": ("hf_vit", lambda: _hf("vit")),
    "hf_vit_classifier": ("hf_vit", lambda: _hf("vit_cls")),
    "hf_clip": ("hf_clip", lambda: _hf("clip")),
    "hf_clip_projection": ("hf_clip", lambda: _hf("clip_proj")),
    "hf_dinov2": ("hf_dinov2", lambda: _hf("dinov2")),
    "hf_dinov2_registers": ("hf_dinov2", lambda: _hf("dinov2_reg")),
    "hf_dinov2_registers_classifier": ("hf_dinov2", lambda: _hf("dinov2_cls")),
    "hf_siglip": ("hf_siglip", lambda: _hf("siglip")),
    "hf_dinov3": ("hf_dinov3", lambda: _hf("dinov3")),  # RoPE, registers, LayerScale, GELU
    "hf_dinov3_gated": ("hf_dinov3", lambda: _hf("dinov3_gated")),  # SwiGLU MLP, no registers
    "hf_aimv2": ("hf_aimv2", lambda: _hf("aimv2")),  # RMSNorm, SwiGLU, learned positions, mean readout
    "hf_aimv2_native_head": ("hf_aimv2", lambda: _hf("aimv2_native_head")),  # sinusoidal positions, attention pool
    # NaFlex: patchified inside, each image at its own size, padding keys masked (fixed-size inputs here)
    "hf_siglip2": ("hf_siglip2", lambda: _hf("siglip2")),  # attention-pool head
    "hf_siglip2_mean": ("hf_siglip2", lambda: _hf("siglip2_mean")),  # no head: masked mean readout
    "timm_naflex_gap": ("timm_naflex", lambda: _timm_naflex("naflexvit_base_patch16_gap")),  # CLS + 3 registers, avg
    "timm_naflex_siglip": ("timm_naflex", lambda: _timm_naflex("naflexvit_base_patch16_siglip")),  # no prefix, map
}
