"""The default training recipe's options (issue 27): a learning rate scaled by each SAE's width, the
decoder rows' norm at initialisation, ``b_dec`` at the geometric median, and SAELens's BatchTopK and
Matryoshka BatchTopK training SAEs as architectures."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from sae_vision_ext.training.config import VisionSAETrainingConfig, width_scaled_lr
from sae_vision_ext.training.train import build_training_sae
from sae_vision_ext.training.trainer import initial_b_dec

HOOK = "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": 0}, "lr must be positive or None, got 0"),
        ({"lr": -1e-3}, r"lr must be positive or None, got -0\.001"),
        ({"decoder_init_norm": 0}, "decoder_init_norm must be positive or None, got 0"),
        ({"decoder_init_norm": "big"}, "decoder_init_norm must be a number, got the string 'big'"),
        ({"architecture": "batch_topk"}, r"architecture 'batch_topk'\. Did you mean 'batchtopk'"),
        ({"architecture": "matryoshka"}, r"Unknown SAELens training architecture 'matryoshka'.*matryoshka_batchtopk"),
    ],
)
def test_recipe_fields_refuse_bad_values_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionSAETrainingConfig(**fields)


def test_width_scaled_lr_is_dictionary_learnings_rule_per_sae():
    assert width_scaled_lr(2**14) == pytest.approx(2e-4)
    assert width_scaled_lr(512) == pytest.approx(2e-4 * 32**0.5)  # 1.131e-3
    cfg = VisionSAETrainingConfig()  # the default: lr None
    assert cfg.lr is None and cfg.lr_for(2048) == pytest.approx(2e-4 * 8**0.5)
    assert cfg.lr_end_for(2048) == pytest.approx(2e-4 * 8**0.5 / 10)
    fixed = VisionSAETrainingConfig(lr="3e-4", lr_end=1e-5)
    assert (fixed.lr_for(512), fixed.lr_end_for(512)) == (3e-4, 1e-5)


def test_each_sae_of_a_run_trains_at_its_own_width_scaled_lr(tmp_path):
    """Two hooks of different width in one run: each SAE's Adam and schedule run at its own rate."""
    from sae_vision_ext.training import train as train_module

    cfg = VisionSAETrainingConfig(
        layers=[1, 2], n_images=40, training_tokens=2048, train_batch_size=512, shuffle_buffer_tokens=2048,
        image_batch_size=20, k=8, d_sae=256, per_layer={"blocks.2.hook_resid_post": {"d_sae": 1024}},
        output_dir=str(tmp_path),
    )  # fmt: skip
    seen = {}
    original = train_module._fit

    def record(cfg, trainer, *args):
        for hook, t in trainer.trainers.items():
            seen[hook] = (t.optimizer.param_groups[0]["lr"], t.cfg.lr_end, t.sae is trainer.saes[hook])
        return original(cfg, trainer, *args)

    train_module._fit = record
    try:
        train_module.train_saes(cfg)
    finally:
        train_module._fit = original
    assert seen[HOOK] == (pytest.approx(2e-4 * 64**0.5), pytest.approx(2e-4 * 64**0.5 / 10), True)
    assert seen["blocks.2.hook_resid_post"] == (pytest.approx(8e-4), pytest.approx(8e-5), True)


@pytest.mark.parametrize("norm", [0.1, 1.0])
def test_decoder_rows_start_at_decoder_init_norm(norm):
    torch.manual_seed(0)
    sae = build_training_sae(VisionSAETrainingConfig(decoder_init_norm=norm, k=8), HOOK, 128, {})
    norms = sae.W_dec.norm(dim=-1)
    assert norms.shape == (512,)
    torch.testing.assert_close(norms, torch.full_like(norms, norm))


def test_geometric_median_b_dec_resists_outliers_the_mean_follows():
    class Identity:
        def activation_scaler(self, x):
            return x

    torch.manual_seed(0)
    sae = build_training_sae(VisionSAETrainingConfig(k=2, d_sae=8, normalize_activations="none"), HOOK, 4, {})
    x = torch.randn(400, 4) * 0.1
    x[:40] += 50.0  # a tenth of the tokens far away
    mean = initial_b_dec(Identity(), sae, [x], "mean")
    median = initial_b_dec(Identity(), sae, [x], "geometric_median")
    assert float(mean.norm()) > 4.0 and float(median.norm()) < 0.2


def _train_step(sae, x):
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    return sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )


def test_batchtopk_keeps_k_per_token_on_average_over_the_batch_not_per_token():
    torch.manual_seed(0)
    sae = build_training_sae(VisionSAETrainingConfig(architecture="batchtopk", k=8), HOOK, 128, {})
    x = torch.randn(256, 128) * torch.linspace(0.2, 3.0, 256)[:, None]  # tokens of very different norm
    l0 = (_train_step(sae, x).feature_acts != 0).sum(-1).float()
    assert float(l0.mean()) == pytest.approx(8.0)  # k on average over the batch
    assert float(l0.min()) < 8 < float(l0.max())  # ...but not per token, as TopK would
    assert type(sae).__name__ == "BatchTopKTrainingSAE"


def test_matryoshka_trains_nested_prefixes_of_the_dictionary():
    torch.manual_seed(0)
    sae = build_training_sae(VisionSAETrainingConfig(architecture="matryoshka_batchtopk", k=8), HOOK, 128, {})
    assert type(sae).__name__ == "MatryoshkaBatchTopKTrainingSAE"
    assert list(sae.cfg.matryoshka_widths) == [128, 256, 512]
    out = _train_step(sae, torch.randn(64, 128))
    inner = [key for key in out.losses if "inner" in key or "matryoshka" in key]
    assert inner, f"no per-prefix loss among {sorted(out.losses)}"
    assert float((out.feature_acts != 0).sum(-1).float().mean()) == pytest.approx(8.0)
