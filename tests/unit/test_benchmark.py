"""ViSAEBench's metrics through our adapters (saes/benchmark.py), our FVU/L0/dead counts against
ViSAEBench's on the same activations, and stability across seeds (saes/stability.py)."""

from __future__ import annotations

import pytest
import torch

import sae_vision_ext as sve
from sae_vision_ext.saes.benchmark import (
    METRICS,
    VisaeBenchBackbone,
    VisaeBenchSAE,
    benchmark_sae,
    patch_activations,
)
from sae_vision_ext.saes.benchmark_report import format_table, plot_radar, radar_value
from sae_vision_ext.saes.evaluate import evaluate_sae
from sae_vision_ext.saes.stability import matched_cosines, stability

HOOK0 = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def shapes():
    torch.manual_seed(0)
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    data = sve.make_shapes(96, seed=4242)
    x, y = data.tensors()
    return model, model.preprocess(x), y


def test_fvu_l0_dead_agree_with_visaebench(shapes):
    """Same activations (every token of the hook), same SAE: L0 and the dead count are equal; FVU
    differs by definition (docs/saes.md, 'ViSAEBench's metrics'). Ours is sum ||x - x_hat||^2 / sum
    ||x - mu||^2 (mu the mean vector). ViSAEBench's accumulates per-token sums and divides by the
    token count n: Var = sum ||v||^2 / n - (sum of all entries / n)^2, i.e. it subtracts (sum_j mu_j)^2
    where a variance subtracts sum_j mu_j^2. Asserted through that exact identity."""
    from visaebench.metrics import FVU

    model, pixels, labels = shapes
    sae = sve.load_sae(f"sve:shapes-vit/{HOOK0}")  # layer 0 on 96 images: some features never fire
    ours = evaluate_sae(model, sae, pixels, labels)
    _, cache = model.run_with_cache(pixels, names_filter=HOOK0, return_cache_object=False)
    x = cache[HOOK0].flatten(0, 1).float()  # [n_tokens, d]: CLS and patches, as evaluate_sae uses
    theirs = FVU().compute(VisaeBenchSAE(sae), x, device="cpu", dict_size=sae.cfg.d_sae)

    n = len(x)
    assert theirs.metadata["n_tokens"] == ours["n_tokens"] == n == 96 * 65
    assert theirs.metadata["l0"] == pytest.approx(ours["l0"], abs=1e-6)
    dead = round(ours["dead_fraction"] * sae.cfg.d_sae)
    assert dead > 0
    assert theirs.metadata["dead_features"] == dead

    with torch.no_grad():
        xd = x.double()
        res = xd - torch.cat([sae.decode(sae.encode(c)) for c in x.split(4096)]).double()
        mu, r_mu = xd.mean(0), res.mean(0)
        s_mu = (xd - mu).pow(2).sum()  # our denominator; our numerator is ours["fvu"] * s_mu
        numerator = ours["fvu"] * s_mu - n * r_mu.sum() ** 2
        denominator = s_mu + n * mu.pow(2).sum() - n * mu.sum() ** 2
    assert theirs.value == pytest.approx(float(numerator / denominator), rel=1e-5)
    assert abs(theirs.value - ours["fvu"]) > 1e-3  # the difference is real, not rounding


def test_benchmark_runs_visaebench_metrics_and_skips_with_reasons(shapes, tmp_path):
    from visaebench.metrics import FVU, SparseProbing

    model, pixels, labels = shapes
    sae = sve.load_sae("sve:shapes-vit/blocks.3.hook_resid_post")
    res = sve.benchmark_sae(model, sae, pixels, labels, metric_options={"localization": {"min_images_per_feature": 5}})
    assert [r.key for r in res.rows] == list(METRICS)
    assert res.n_patches == 64
    ran = {r.key for r in res.rows if r.value is not None}
    assert ran == {"localization", "fvu", "downstream_preservation", "sparse_probing"}
    for key, needs in (("monosemanticity", "evaluator="), ("cross_domain", "ood="), ("absorption", "sibling_groups")):
        assert needs in res.row(key).skipped and res.row(key).value is None

    acts = patch_activations(model, "blocks.3.hook_resid_post", pixels)  # patch tokens only, as ViSAEBench's backbones
    assert acts.shape == (96, 64, 128)
    direct = FVU().compute(VisaeBenchSAE(sae), acts.flatten(0, 1), device="cpu")
    assert res.row("fvu").value == pytest.approx(direct.value, abs=1e-9)
    probe = SparseProbing().compute(VisaeBenchSAE(sae), acts, labels=labels.numpy(), device="cpu", seed=42)
    assert res.row("sparse_probing").value == pytest.approx(probe.value, abs=1e-9)
    assert res.row("sparse_probing").name == "sparse_probing_auc"

    # a random SAE of the same shape keeps less of the class information than the trained one
    rand = sve.load_sae("sve:shapes-vit/blocks.3.hook_resid_post")
    with torch.no_grad():
        for p in (rand.W_enc, rand.W_dec):
            p.copy_(torch.randn_like(p) * p.std())
    worse = benchmark_sae(model, rand, pixels, labels, metrics=["fvu", "downstream_preservation"])
    assert worse.row("fvu").value > 5 * res.row("fvu").value
    assert worse.row("downstream_preservation").value < res.row("downstream_preservation").value

    table = format_table([res, worse], ["shipped", "random"])
    assert "| M2 FVU ↓ |" in table and "M5 monosemanticity skipped: needs a second backbone" in table
    png = plot_radar([res], tmp_path / "radar.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert radar_value(res.row("fvu")) == pytest.approx(1 - res.row("fvu").value)


def test_benchmark_with_evaluator_groups_and_ood(shapes):
    model, pixels, labels = shapes
    sae = sve.load_sae("sve:shapes-vit/blocks.3.hook_resid_post")
    biased = sve.HookedViT.from_pretrained("sve:shapes-vit-biased")
    ood_x, ood_y = sve.make_shapes(48, seed=7, balanced=True).tensors()  # the marker on half the images
    res = benchmark_sae(
        model,
        sae,
        pixels,
        labels,
        metrics=["monosemanticity", "cross_domain", "absorption"],
        evaluator=biased,
        ood={"marker": (model.preprocess(ood_x), ood_y)},
        sibling_groups={"shape": range(6)},
    )
    assert all(r.value is not None for r in res.rows)
    assert 0 < res.row("monosemanticity").value < 1
    assert res.row("absorption").metadata["num_tests"] == 6  # one group, one test per shape
    per = res.row("cross_domain").metadata["per_dataset"]["marker"]
    assert per["num_images"] == 48 and 0 < per["composite"] <= 1

    emb = VisaeBenchBackbone(biased).extract_activations(list(pixels[:3]), layer=-1)
    assert emb.shape == (3, 64, 128)
    with pytest.raises(ValueError, match="different backbone"):
        benchmark_sae(model, sae, pixels, labels, evaluator=model)
    with pytest.raises(ValueError, match="Did you mean 'fvu'"):
        benchmark_sae(model, sae, pixels, labels, metrics=["fvuu"])


def test_stability_matches_permuted_rows_and_counts_the_threshold():
    g = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:8]  # 8 orthonormal rows in 16-d
    b = a[torch.randperm(8, generator=g)] * 3.0  # same directions, permuted and rescaled
    assert torch.allclose(matched_cosines(a, b), torch.ones(8, dtype=torch.float64))
    # rotate rows 0-3 of b's directions by 60 degrees towards unused directions: cosine 0.5 each
    q = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    c = a.clone()
    spare = torch.linalg.qr(torch.cat([a, q]).T)[0].T[8:12]  # orthogonal to every row of a
    c[:4] = 0.5 * a[:4] + (3**0.5 / 2) * spare
    s = stability([a, b, c], threshold=0.7)
    assert s.shares == pytest.approx([1.0, 0.5, 0.5])
    assert s.mean == pytest.approx(2 / 3) and s.std == pytest.approx((1 / 18) ** 0.5)
    assert stability([a, c], threshold=0.5 - 1e-4).shares == pytest.approx([1.0])
    # Hungarian, not greedy: greedy takes the best pair (0.72) and leaves 0.05; the matching takes 0.69 + 0.70
    u = torch.tensor([[0.72, 0.69, (1 - 0.72**2 - 0.69**2) ** 0.5], [0.70, 0.05, (1 - 0.70**2 - 0.05**2) ** 0.5]])
    assert sorted(matched_cosines(u, torch.eye(3)[:2]).tolist()) == pytest.approx([0.69, 0.70], abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 runs"):
        stability([a])
