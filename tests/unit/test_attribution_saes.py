"""Exactness of attribution for every SAE configuration users train or load (float64, random models).

Grid: SAELens inference class × ``normalize_activations`` × ``apply_b_dec_to_input`` ×
``rescale_acts_by_decoder_norm`` (decoder rows far from unit norm) × JumpReLU thresholds, on one
adapter; the seed paper's setting (layer_norm TopK, rescaled rows) on every adapter family.
Semantic checks: the sum rule, a frozen intervention moves every next-layer target by exactly
``Δ/a · edge``, second derivatives vanish, and the affine view reproduces SAELens's own encode/decode.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import ARCHS, FAMILIES, NORMS, build_native, check_exact, images, make_sae, one_per_adapter, rrm_with

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.circuits.models import ResidualReplacementModel
from sae_vision_ext.saes import affine

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("arch", "norm", "apply_b_dec"), list(itertools.product(ARCHS, NORMS, [True, False])))
def test_affine_view_reproduces_saelens_encode_and_decode(arch, norm, apply_b_dec):
    sae = make_sae(arch, norm, apply_b_dec, d_in=16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 16, generator=g, dtype=torch.float64) * 3 + 0.7
    acts = sae.encode(x)
    recon = sae.decode(acts)
    norm_state = affine.frozen_norm(sae, x)
    h = affine.pre_acts(sae, x, norm_state)
    active = acts != 0
    assert active.any()
    torch.testing.assert_close(h[active], acts[active], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(affine.decode(sae, acts, norm_state), recon, atol=1e-12, rtol=1e-12)
    # effective decoder rows and bias rebuild the reconstruction one token at a time
    b, p = 1, 4
    feats = active[b, p].nonzero().flatten()
    rebuilt = (acts[b, p, feats, None] * affine.decoder_directions(sae, feats, norm_state.select((b, p)))).sum(0)
    torch.testing.assert_close(rebuilt + affine.decoder_bias(sae, norm_state.select((b, p))), recon[b, p])
    # inside frozen_normalisation SAELens's own encode/decode use the frozen statistics
    with affine.frozen_normalisation(sae, norm_state):
        moved = sae.encode(x * 1.7 + 0.3)
        h_moved = affine.pre_acts(sae, x * 1.7 + 0.3, norm_state)
        torch.testing.assert_close(h_moved[moved != 0], moved[moved != 0])
        torch.testing.assert_close(sae.decode(moved), affine.decode(sae, moved, norm_state))


@pytest.mark.parametrize(("arch", "norm", "apply_b_dec"), list(itertools.product(ARCHS, NORMS[:3], [True, False])))
@pytest.mark.parametrize("variant", FAMILIES)
def test_attribution_exact_for_every_sae_configuration(variant, arch, norm, apply_b_dec):
    rrm = rrm_with(variant, arch, norm, apply_b_dec)
    assert check_exact(rrm, images(1).double(), n_sources=1) > 5


def _readout_is_affine(variant: str) -> bool:
    return HookedViT.from_model(build_native(variant)).adapter.nonlinear_readout() is None


LINEAR_READOUT = [v for v in one_per_adapter() if _readout_is_affine(v)]


def test_every_adapter_family_has_a_traceable_variant():
    """The family sweep below must not shrink silently: each adapter family has at least one variant
    with an affine readout (hf_vit through its classifier, SigLIP families are refused)."""
    from helpers import VARIANTS

    families = {VARIANTS[v][0] for v in VARIANTS if _readout_is_affine(v)}
    assert families >= {"timm", "open_clip", "hf_vit", "hf_clip", "hf_dinov2"}
    assert {VARIANTS[v][0] for v in FAMILIES} == families  # the configuration grid covers them all


@pytest.mark.parametrize(
    "variant", sorted({v for v in LINEAR_READOUT} | {"hf_vit_classifier", "hf_dinov2_registers_classifier"})
)
def test_attribution_exact_with_the_seed_papers_saes_on_every_adapter_family(variant):
    """Per-token standardised TopK SAEs (the seed paper's), decoder rows not unit norm."""
    rrm = rrm_with(variant, "topk_rescale", "layer_norm", True)
    assert check_exact(rrm, images(1).double(), n_sources=2) > 10


@pytest.mark.parametrize("variant", ["hf_vit", "hf_siglip", "timm_map_siglip"])
def test_nonlinear_readouts_are_refused_naming_the_part(variant):
    rrm = rrm_with(variant, "topk", "none", True) if variant != "hf_siglip" else None
    if rrm is None:
        model = HookedViT.from_model(build_native(variant)).double()
        saes = [
            make_sae("topk", "none", True, d_in=model.cfg.d_model, hook=f"blocks.{i}.hook_resid_post")
            for i in range(model.cfg.n_layers)
        ]
        rrm = ResidualReplacementModel(model, saes)
    with pytest.raises(ValueError, match=r"tanh|attention-pool"):
        Attributor(rrm)


@pytest.mark.parametrize("layers", [[0, 1, 2], [0, 2], [1, 3], [2]])
def test_attribution_exact_on_any_subset_of_layers(layers):
    """The seed paper's setting ([0 .. L-2]: no SAE after the last block) and gaps: the blocks without an
    SAE are carried through frozen; edges run between consecutive SAE layers."""
    from helpers import _timm

    torch.manual_seed(0)
    native = _timm(depth=4).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = HookedViT.from_model(native).double()
    saes = [
        make_sae(
            "topk_rescale",
            "layer_norm",
            True,
            d_in=model.cfg.d_model,
            seed=layer,
            hook=f"blocks.{layer}.hook_resid_post",
        )
        for layer in layers
    ]
    rrm = ResidualReplacementModel(model, saes)
    assert rrm.layers == layers
    assert check_exact(rrm, images(1).double()) >= 3
    g = Attributor(rrm).attribute(images(1).double())
    a = g.adjacency.coalesce()
    src_layer, dst_layer = g.node_layer[a.indices()[1]], g.node_layer[a.indices()[0]]
    nxt = {-1: layers[0], **dict(zip(layers, [*layers[1:], 4], strict=True))}
    assert all(nxt[int(s)] == int(d) for s, d in zip(src_layer, dst_layer, strict=True))
    is_feature = torch.tensor([k == "feature" for k in g.node_kind])
    assert set(g.node_layer[is_feature].tolist()) <= set(layers)
    with pytest.raises(ValueError, match=r"SAE layers are \["):
        rrm.intervene(images(1).double(), [(5, 0, 0, 1.0)])


def test_batchtopk_training_sae_saved_as_jumprelu_is_exact(tmp_path):
    from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model = HookedViT.from_model(build_native("timm_cls")).double()
    saes = []
    for layer in range(model.cfg.n_layers):
        torch.manual_seed(layer)
        cfg = BatchTopKTrainingSAEConfig(
            d_in=32, d_sae=40, k=5, dtype="float64", metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
        )
        train = BatchTopKTrainingSAE(cfg).double()
        with torch.no_grad():
            train.W_enc.normal_(0, 0.4)
            train.b_dec.normal_(0, 0.1)
            train.topk_threshold.fill_(0.2)
        train.save_inference_model(tmp_path / str(layer))
        saes.append(SAE.load_from_disk(tmp_path / str(layer)).double())
    assert {s.cfg.architecture() for s in saes} == {"jumprelu"}
    assert check_exact(ResidualReplacementModel(model, saes), images(1).double()) > 10


def test_unsupported_saes_are_refused_by_name():
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    tc = Transcoder(
        TranscoderConfig(
            d_in=32,
            d_sae=40,
            d_out=32,
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post", hook_name_out="blocks.1.hook_resid_post"),
        )
    )
    with pytest.raises(ValueError, match="transcoder"):
        affine.check_linearisable(tc)
    sae = make_sae("topk", "none", True)
    sae.cfg.normalize_activations = "per_batch_magic"
    with pytest.raises(ValueError, match="normalize_activations='per_batch_magic'"):
        affine.check_linearisable(sae)
