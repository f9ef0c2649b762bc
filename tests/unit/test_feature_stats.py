"""Streaming feature statistics equal a dense recomputation; bounded memory; save/load round trip."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, images
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_vision_ext import HookedViT
from sae_vision_ext.vis.stats import HIST_EDGES, FeatureStats, collect_feature_stats


def topk_sae(hook: str, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=6, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
    return sae


@pytest.fixture(scope="module")
def setup():
    model = HookedViT.from_model(build_native("timm_registers"))  # 4 prefix tokens, 4x4 patches
    saes = [topk_sae("blocks.0.hook_resid_post", 0), topk_sae("blocks.1.hook_resid_pre", 1)]
    x = torch.cat([images(7, seed=s) for s in range(3)])  # 21 images
    labels = torch.arange(21) % 3
    stats = collect_feature_stats(model, saes, x, labels, top_k=5, batch_size=4, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=[s.cfg.metadata.hook_name for s in saes])
        dense = {s.cfg.metadata.hook_name: s.encode(cache[s.cfg.metadata.hook_name]) for s in saes}
    return model, saes, x, labels, stats, dense


def test_streamed_statistics_equal_dense_recomputation(setup):
    *_, labels, stats, dense = setup
    for hook, f in dense.items():  # f: [21, 20, 48]
        s = stats[hook]
        assert s.n_images == 21 and s.n_tokens == 21 * 20
        fires = f != 0
        assert torch.equal(s.fire_tokens, fires.sum((0, 1)))
        assert torch.equal(s.fire_images, fires.any(1).sum(0))
        assert torch.equal(s.fire_prefix, fires[:, :4].sum((0, 1)))
        torch.testing.assert_close(s.mean_act, f.mean((0, 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.max_act, f.amax((0, 1)))
        torch.testing.assert_close(s.spatial_map(), f[:, 4:].mean(0).T.reshape(48, 4, 4), atol=1e-5, rtol=1e-5)
        per_image = f.amax(1)  # [21, 48]
        for feat in range(48):
            best = per_image[:, feat].topk(5)
            got = s.top_examples(feat)
            expected = [(float(v), int(i)) for v, i in zip(best.values, best.indices, strict=True) if v > 0]
            assert [(round(v, 5), i) for v, i, _ in got] == [(round(v, 5), i) for v, i in expected]
            for v, i, tok in got:
                assert abs(float(f[i, tok, feat]) - v) < 1e-5, "the token is where the image peaks"
        counts = torch.stack([torch.histc(torch.log10(f[..., j][fires[..., j]]).clamp(-4, 2), 30, -4, 2)
                              for j in range(48)])  # fmt: skip
        assert int(s.hist.sum()) == int(fires.sum()) and s.hist.shape == (48, len(HIST_EDGES) - 1)
        assert (s.hist.sum(1) == counts.sum(1).long()).all()
        class_mean = torch.stack([f[labels == c].sum(1).mean(0) for c in range(3)], 1)  # [48, 3]
        best = class_mean.max(1).values
        sel = torch.where(best > 0, (best - (class_mean.sum(1) - best) / 2) / best, torch.zeros_like(best))
        torch.testing.assert_close(s.class_selectivity, sel, atol=1e-4, rtol=1e-4)


def test_label_distribution_and_views(setup):
    *_, labels, stats, _ = setup
    s = stats["blocks.0.hook_resid_post"]
    feat = int(s.fire_images.argmax())
    dist = s.label_distribution(feat, labels)
    assert int(dist.sum()) == len(s.top_examples(feat)) and dist.shape == (3,)
    assert ((s.prefix_share >= 0) & (s.prefix_share <= 1)).all() and s.spatial_concentration.shape == (48,)
    with pytest.warns(DeprecationWarning, match="prefix_share"):
        torch.testing.assert_close(s.cls_share, s.prefix_share)


def test_memory_does_not_grow_with_images(setup):
    model, saes, *_ = setup
    small = collect_feature_stats(model, saes[0], images(4), top_k=5, progress=False)
    big = collect_feature_stats(model, saes[0], torch.cat([images(8, seed=s) for s in range(5)]), top_k=5,
                                batch_size=8, progress=False)  # fmt: skip
    size = lambda st: sum(t.numel() * t.element_size() for t in st.tensors.values())
    assert size(small) == size(big) and big.n_images == 40


def test_save_load_round_trip(setup, tmp_path):
    *_, stats, _ = setup
    s = stats["blocks.1.hook_resid_pre"]
    folder = s.save(tmp_path)
    again = FeatureStats.load(folder)
    assert again.grid == s.grid and again.n_tokens == s.n_tokens and again.top_examples(3) == s.top_examples(3)
    for k, v in s.tensors.items():
        assert torch.equal(again.tensors[k], v), k
