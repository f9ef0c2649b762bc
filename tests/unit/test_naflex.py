"""NaFlex models (HF SigLIP 2, timm NaFlexVit): images at their own sizes, padding masked and never harvested.

Parity, hooks, splicing and exactness on fixed-size inputs run through ``tests/helpers.py::VARIANTS``;
these tests feed batches of mixed sizes and compare with the native model fed by its library's own
patchify code."""

from __future__ import annotations

import pytest
import torch
from helpers import PATCH, _timm, build_native

from sae_vision_ext import HookedViT
from sae_vision_ext.activations.cache import CacheSettings, build_cache
from sae_vision_ext.activations.harvest import harvest

NAFLEX = ["hf_siglip2", "hf_siglip2_mean", "timm_naflex_gap", "timm_naflex_siglip"]
SIZES = [(32, 32), (16, 40), (24, 8)]  # grids 4x4, 2x5, 3x1: 16, 10 and 3 patches


def _images(sizes=SIZES, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _native_out(model: HookedViT, images: list[torch.Tensor]) -> torch.Tensor:
    """The native model on inputs built by its library's own patchify and padding code."""
    native = model.wrapped
    if model.cfg.source == "hf_siglip2":
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches, pad_along_first_dim

        n = max((h // PATCH) * (w // PATCH) for _, h, w in (t.shape for t in images))
        padded = [pad_along_first_dim(convert_image_to_patches(t, PATCH), n) for t in images]
        out = native(
            pixel_values=torch.stack([p for p, _ in padded]),
            pixel_attention_mask=torch.stack([m for _, m in padded]),
            spatial_shapes=torch.tensor([(t.shape[1] // PATCH, t.shape[2] // PATCH) for t in images]),
        )
        if out.pooler_output is not None:
            return out.pooler_output
        mask = torch.stack([m for _, m in padded]).bool()
        return torch.stack([h[m].mean(0) for h, m in zip(out.last_hidden_state, mask, strict=True)])
    from timm.models.naflexvit import batch_patchify

    seqs = [batch_patchify(t[None], (PATCH, PATCH)) for t in images]
    n = max(s.shape[1] for s, _ in seqs)
    patches = torch.zeros(len(images), n, seqs[0][0].shape[-1])
    coord = torch.zeros(len(images), n, 2, dtype=torch.long)
    valid = torch.zeros(len(images), n, dtype=torch.bool)
    for i, (s, (rows, cols)) in enumerate(seqs):
        patches[i, : s.shape[1]] = s[0]
        yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        coord[i, : s.shape[1]] = torch.stack([yy.flatten(), xx.flatten()], -1)
        valid[i, : s.shape[1]] = True
    return native(patches, patch_coord=coord, patch_valid=valid)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0)


@pytest.fixture(params=NAFLEX)
def naflex(request) -> HookedViT:
    return HookedViT.from_model(build_native(request.param))


@torch.no_grad()
def test_mixed_sizes_equal_native_with_and_without_hooks(naflex):
    images = _images()
    expected = _native_out(naflex, images)
    assert expected.shape[0] == 3 and expected.abs().max() > 1e-3
    _close(naflex(images), expected)
    out, cache = naflex.run_with_cache(images)
    _close(out, expected)
    assert set(cache.keys()) == set(naflex.hook_dict)


@torch.no_grad()
def test_padding_has_no_influence_on_real_tokens(naflex):
    """Each image's output and real-token activations equal those of the image run alone."""
    images = _images()
    out, cache = naflex.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_post"))
    mask = cache.token_mask
    n_prefix = naflex.cfg.n_prefix_tokens
    assert mask.sum(1).tolist() == [n_prefix + r * c for r, c in [(4, 4), (2, 5), (3, 1)]]
    assert cache.grid_sizes == [(4, 4), (2, 5), (3, 1)]
    for i, img in enumerate(images):
        alone, single = naflex.run_with_cache(img[None], names_filter=lambda n: n.endswith("hook_resid_post"))
        _close(out[i], alone[0])
        for layer in range(naflex.cfg.n_layers):
            name = f"blocks.{layer}.hook_resid_post"
            _close(cache[name][i][mask[i]], single[name][0])


@torch.no_grad()
def test_padded_batch_with_sizes_equals_list_and_pattern_masks_padding(naflex):
    images = _images()
    padded = torch.zeros(3, 3, 32, 40)
    for i, t in enumerate(images):
        padded[i, :, : t.shape[1], : t.shape[2]] = t
    padded[1, :, 20:, :] = 1e3  # outside image 1: ignored
    from_list, cache = naflex.run_with_cache(images, names_filter="blocks.1.attn.hook_pattern")
    _close(naflex(padded, image_sizes=[tuple(t.shape[1:]) for t in images]), from_list)
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, head, query, key]
    pad_keys = ~cache.token_mask
    assert pad_keys.sum() > 0
    assert pattern.masked_select(pad_keys[:, None, None, :]).abs().max() == 0
    real_rows = pattern.sum(-1).masked_select(cache.token_mask[:, None, :])
    torch.testing.assert_close(real_rows, torch.ones_like(real_rows))


@pytest.mark.parametrize(
    ("inputs", "sizes", "message"),
    [
        ([torch.zeros(3, 20, 32)], None, "not a multiple of the patch size 8"),
        (torch.zeros(2, 3, 32, 32), [(32, 32)], "image_sizes has 1 entries for a batch of 2"),
        (torch.zeros(1, 3, 32, 32), [(40, 32)], "does not fit the padded batch"),
        (torch.zeros(3, 32, 32), None, "Expected images as a"),
    ],
)
def test_bad_naflex_inputs_name_the_fix(inputs, sizes, message):
    model = HookedViT.from_model(build_native("timm_naflex_gap"))
    with pytest.raises(ValueError, match=message):
        model(inputs, image_sizes=sizes)


def test_fixed_grid_model_refuses_mixed_sizes_and_stacks_equal_ones():
    model = HookedViT.from_model(_timm().eval())
    with pytest.raises(ValueError, match="use a NaFlex model"):
        model(_images([(32, 32), (16, 32)]))
    images = _images([(32, 32), (32, 32)])
    with torch.no_grad():
        _close(model(images), model(torch.stack(images)))
    assert model.token_mask.all() and model.grid_sizes == [(4, 4), (4, 4)]


@torch.no_grad()
@pytest.mark.parametrize("variant", ["timm_naflex_gap", "hf_siglip2"])
def test_harvest_and_cache_hold_exactly_the_real_tokens(variant, tmp_path):
    """Mixed sizes: the harvest holds sum over images of (prefix + rows * cols) tokens, each equal to the
    image's own activation; the on-disk cache counts the same."""
    model = HookedViT.from_model(build_native(variant))
    n_prefix = model.cfg.n_prefix_tokens
    sizes = [(32, 32), (16, 40), (24, 8), (8, 8), (40, 16)]
    images = _images(sizes)
    expected = sum(n_prefix + (h // PATCH) * (w // PATCH) for h, w in sizes)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    chunks = list(harvest(model, [images[:3], images[3:]], hooks))
    rows = torch.cat([c[hooks[0]] for c in chunks])
    assert rows.shape[0] == expected == sum(c[hooks[1]].shape[0] for c in chunks)  # 5 * n_prefix + 55
    _, single = model.run_with_cache(images[3][None], names_filter=hooks[0])
    start = sum(n_prefix + (h // PATCH) * (w // PATCH) for h, w in sizes[:3])
    _close(rows[start : start + n_prefix + 1], single[hooks[0]][0])
    patches = list(harvest(model, [images], hooks, "patches", patches_per_image=4, generator=torch.Generator()))
    assert patches[0][hooks[0]].shape[0] == sum(min(4, (h // PATCH) * (w // PATCH)) for h, w in sizes)

    settings = CacheSettings(
        model_name=variant, hook_names=tuple(hooks), dataset_fingerprint="mixed", n_images=5, images_per_shard=3
    )
    folder = build_cache(model, images, settings, tmp_path, image_batch_size=2, progress=False)
    import json

    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["n_tokens"] == expected and meta["n_images"] == 5


@torch.no_grad()
def test_feature_stats_heatmaps_and_dashboard_use_each_images_own_grid(tmp_path):
    """Stats over a mixed-size list equal the stats folded image by image; padding never counts; each
    heatmap has its image's (rows, cols); the dashboard builds from the list."""
    from helpers import make_sae

    from sae_vision_ext.vis.dashboard import build_dashboard
    from sae_vision_ext.vis.plots import feature_heatmaps
    from sae_vision_ext.vis.stats import FeatureStats, collect_feature_stats

    model = HookedViT.from_model(build_native("timm_naflex_gap")).double()
    sae = make_sae("standard", "none", True, d_in=model.cfg.d_model, d_sae=24, hook="blocks.1.hook_resid_post")
    images = [t.double() for t in _images([(32, 32), (16, 40), (24, 8), (8, 16)])]
    stats = collect_feature_stats(model, sae, images, batch_size=4, top_k=3, progress=False)
    n_prefix = model.cfg.n_prefix_tokens
    assert stats.n_tokens == sum(n_prefix + (t.shape[1] // PATCH) * (t.shape[2] // PATCH) for t in images) == 47
    one_by_one = FeatureStats.empty(sae.cfg.metadata.hook_name, 24, 3, n_prefix, model.cfg.grid_size)
    for i, img in enumerate(images):
        _, cache = model.run_with_cache(img[None], names_filter=sae.cfg.metadata.hook_name)
        one_by_one.update(sae.encode(cache[sae.cfg.metadata.hook_name]), i, None, None, model.grid_sizes)
    for key in ("fire_tokens", "fire_images", "fire_prefix", "hist", "top_images", "top_tokens"):
        assert torch.equal(stats.tensors[key], one_by_one.tensors[key]), key
    for key in ("sum_act", "spatial_sum", "top_values", "max_act"):
        torch.testing.assert_close(stats.tensors[key], one_by_one.tensors[key], rtol=1e-6, atol=1e-6)  # float32 sums
    assert stats.fire_tokens.sum() > 0 and stats.spatial_map(0).shape == (4, 4)

    maps = feature_heatmaps(model, sae, images, int(stats.fire_tokens.argmax()))
    assert [tuple(m.shape) for m in maps] == [(4, 4), (2, 5), (3, 1), (1, 2)]
    alone = feature_heatmaps(model, sae, images[1:2], int(stats.fire_tokens.argmax()))
    torch.testing.assert_close(maps[1], alone[0])

    index = build_dashboard(model, [sae], images, tmp_path, n_feature_pages=2, n_image_pages=2, progress=False)
    assert index.exists() and len(list((tmp_path / "images").glob("img*.png"))) == 2


@pytest.mark.parametrize("variant", ["timm_naflex_gap", "hf_siglip2_mean"])
def test_traced_image_at_its_own_size_is_exact_and_graph_uses_its_grid(variant):
    """A 16x40 image (grid 2x5, not the model's 4x4): sum rule and frozen interventions hold, and the
    graph's grid, position labels and circuit-tracer prompt tokens are the image's own."""
    from helpers import check_exact, rrm_for

    from sae_vision_ext.circuits.graph.export import thinned_labels
    from sae_vision_ext.circuits.graph.nodes import position_labels

    rrm = rrm_for(variant)
    x = torch.randn(1, 3, 16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert check_exact(rrm, x) > 20
    from helpers import Attributor

    graph = Attributor(rrm, batch_size=8).attribute(x, progress=False)
    n_prefix = rrm.model.cfg.n_prefix_tokens
    assert graph.grid == (2, 5)
    labels = position_labels(graph)
    assert len(labels) == n_prefix + 10 and labels[n_prefix + 5] == "p(1,0)" and labels[-1] == "p(1,4)"
    assert [t for t in thinned_labels(graph)[n_prefix:] if t != "·"] == ["p(0,0)", "p(1,0)"]


@torch.no_grad()
def test_analyse_features_on_mixed_sizes_scores_images_by_their_real_tokens():
    """Image attributes on a mixed-size list: AUROCs and firing counts equal those of the images analysed
    one by one (padding never scores); patch attributes on mixed grids are refused, naming the grids."""
    from helpers import make_sae

    from sae_vision_ext.vis.analysis import Attribute, analyse_features

    model = HookedViT.from_model(build_native("hf_siglip2_mean")).double()
    sae = make_sae("standard", "none", True, d_in=model.cfg.d_model, d_sae=16, hook="blocks.0.hook_resid_post")
    sizes = [(32, 32), (16, 40), (24, 8), (8, 16), (40, 16), (16, 16)]
    images = [t.double() for t in _images(sizes)]
    attr = Attribute("wide", torch.tensor([int(w > h) for h, w in sizes]), ["no", "yes"])
    mixed = analyse_features(model, [sae], images, [attr], batch_size=6)["blocks.0.hook_resid_post"]
    scores = []
    for img in images:
        _, cache = model.run_with_cache(img[None], names_filter="blocks.0.hook_resid_post")
        scores.append(sae.encode(cache["blocks.0.hook_resid_post"])[0].amax(0))
    scores = torch.stack(scores)  # [n, d_sae]: each image's own maximum
    assert torch.equal(mixed.fires, (scores > 0).sum(0))
    yes = torch.tensor([w > h for h, w in sizes])
    a, b = scores[yes][:, None], scores[~yes][None]
    expected = ((a > b).double() + 0.5 * (a == b).double()).mean((0, 1))  # the rank AUROC, ties halved
    torch.testing.assert_close(mixed.auroc[0][:, 1].double(), expected, atol=1e-6, rtol=0)
    rows = torch.arange(model.cfg.n_patches) // model.cfg.grid_size[1]
    patch = Attribute("top", (rows < 2).long().expand(6, -1), ["no", "yes"], level="patch")
    with pytest.raises(ValueError, match="these images have grids"):
        analyse_features(model, [sae], images, [patch], batch_size=6)


def test_preprocess_naflex_keeps_aspect_ratio_within_the_patch_budget():
    """Sizes as SigLIP 2's processor picks them; PIL images of three aspect ratios become a list the
    model takes at their own grids."""
    from PIL import Image
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    from sae_vision_ext.models.naflex import naflex_size, preprocess_naflex

    for h, w, p, n in [(480, 640, 16, 256), (100, 1000, 16, 256), (37, 41, 8, 16), (1000, 90, 14, 196)]:
        assert naflex_size(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n)
    model = HookedViT.from_model(build_native("hf_siglip2"))
    pil = [Image.new("RGB", (w, h), (200, 30, 90)) for w, h in [(64, 64), (120, 40), (30, 90)]]
    pixels = preprocess_naflex(model, pil)
    assert [tuple(t.shape[1:]) for t in pixels] == [(32, 32), (16, 48), (48, 16)]  # <= 16 patches of 8 px
    with torch.no_grad():
        model(pixels)
    assert model.grid_sizes == [(4, 4), (2, 6), (6, 2)]


def test_transcoder_graph_of_an_image_at_its_own_size_uses_its_grid():
    """The transcoder attribution's graph also takes the traced image's (rows, cols), and its sum rule holds."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext.circuits.models import TranscoderReplacementModel

    model = HookedViT.from_model(build_native("timm_naflex_gap")).double()
    tcs = []
    for layer in range(model.cfg.n_layers):
        meta = SAEMetadata(
            hook_name=f"blocks.{layer}.ln2.hook_normalized", hook_name_out=f"blocks.{layer}.hook_mlp_out"
        )
        cfg = sae_lens.SkipTranscoderConfig(
            d_in=32, d_sae=24, d_out=32, dtype="float64", apply_b_dec_to_input=False, metadata=meta
        )
        tc = sae_lens.SkipTranscoder(cfg).double()
        g = torch.Generator().manual_seed(layer)
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        tcs.append(tc)
    x = torch.randn(1, 3, 16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    graph = TranscoderReplacementModel(model, tcs).attribute(x)
    assert graph.grid == (2, 5)
    rows = ~torch.isnan(graph.value)
    A = graph.dense()
    torch.testing.assert_close(A[rows].sum(1) + graph.constant[rows], graph.value[rows], atol=1e-8, rtol=1e-8)
