"""VisionSAETrainingConfig and train_saes: SAELens-format output that plain SAELens loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sae_vision_ext.activations.harvest import harvest
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.train import train_saes


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="Unknown architecture 'topk2'"):
        VisionSAETrainingConfig(architecture="topk2")
    with pytest.raises(ValueError, match="Unknown token_selection 'patch'"):
        VisionSAETrainingConfig(token_selection="patch")
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        VisionSAETrainingConfig(k=0)
    with pytest.raises(ValueError, match=r"per_layer\['blocks.0.hook_resid_post'\] has unknown keys \['kk'\]"):
        VisionSAETrainingConfig(per_layer={"blocks.0.hook_resid_post": {"kk": 3}})
    with pytest.raises(ValueError, match=r"Unknown VisionSAETrainingConfig keys \['lrr'\]"):
        VisionSAETrainingConfig.from_dict({"lrr": 1.0})


def test_config_round_trips_through_yaml_and_json(tmp_path):
    import yaml

    cfg = VisionSAETrainingConfig(k=8, layers=[0, 2], per_layer={"blocks.2.hook_resid_post": {"k": 16}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert VisionSAETrainingConfig.from_file(tmp_path / "c.yaml") == cfg
    assert VisionSAETrainingConfig.from_file(tmp_path / "c.json") == cfg
    assert cfg.for_hook("blocks.2.hook_resid_post", "k") == 16 and cfg.for_hook("blocks.0.hook_resid_post", "k") == 8
    assert cfg.effective_lr_end == pytest.approx(cfg.lr / 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = VisionSAETrainingConfig(
        model_name="sve:shapes-vit", layers=[1, 4], n_images=600, training_tokens=80_000, train_batch_size=512,
        shuffle_buffer_tokens=8192, image_batch_size=50, expansion_factor=2, k=16, lr=1e-3, output_dir=str(out),
        per_layer={"blocks.4.hook_resid_post": {"k": 24}},
    )  # fmt: skip
    return cfg, train_saes(cfg)


def test_trained_saes_explain_held_out_activations(trained):
    from sae_vision_ext import HookedViT

    cfg, saes = trained
    model = HookedViT.from_pretrained(cfg.model_name)
    x, _ = make_shapes(64, seed=999).tensors()
    (acts,) = harvest(model, [model.preprocess(x)], list(saes))
    for hook, sae in saes.items():
        a = acts[hook]
        with torch.no_grad():
            feats = sae.encode(a)
            recon = sae.decode(feats)
        fvu = ((a - recon) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()
        assert fvu < 0.5, f"{hook}: fraction of variance unexplained {fvu:.3f}"
        assert (feats > 0).sum(-1).float().mean() <= sae.cfg.k + 1e-6
    assert saes["blocks.4.hook_resid_post"].cfg.k == 24 and saes["blocks.1.hook_resid_post"].cfg.k == 16


def test_saved_in_saelens_format_loadable_without_this_package(trained):
    cfg, _saes = trained
    path = f"{cfg.output_dir}/blocks.1.hook_resid_post"
    script = (
        "import sys, json; from sae_lens import SAE\n"
        f"sae = SAE.load_from_disk({path!r})\n"
        "assert 'sae_vision_ext' not in sys.modules\n"
        "m = sae.cfg.metadata\n"
        "print(json.dumps([type(sae).__name__, sae.cfg.d_in, sae.cfg.d_sae, m.hook_name, m.model_name,"
        " m.model_class_name, m.context_size, m.token_selection, m.image_size, m.patch_size, m.n_prefix_tokens,"
        " m.dataset, m.sae_vision_ext_version]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == ["TopKSAE", 128, 256, "blocks.1.hook_resid_post", "sve:shapes-vit", "HookedViT", 65, "all",
                   [64, 64], 8, 1, "sve:shapes", "0.1.0"]  # fmt: skip
    saved_cfg = json.loads((__import__("pathlib").Path(cfg.output_dir) / "training_config.json").read_text())
    assert VisionSAETrainingConfig.from_dict(saved_cfg) == cfg


def _small_cfg(out, **kw) -> VisionSAETrainingConfig:
    base = dict(model_name="sve:shapes-vit", layers=[2, 4], n_images=200, training_tokens=512 * 12,
                train_batch_size=512, shuffle_buffer_tokens=4096, image_batch_size=50, expansion_factor=2, k=8,
                seed=1, output_dir=str(out))  # fmt: skip
    return VisionSAETrainingConfig(**(base | kw))


def test_sigterm_checkpoint_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    import os
    import signal

    from sae_lens import SAE
    from safetensors.torch import load_file

    from sae_vision_ext._errors import TrainingInterrupted
    from sae_vision_ext.training import train as train_module

    full = train_saes(_small_cfg(tmp_path / "full"))
    sparsity = load_file(tmp_path / "full" / "blocks.2.hook_resid_post" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (256,)

    cfg = _small_cfg(tmp_path / "interrupted")
    original = train_module._CountingStream.__next__

    def next_then_kill(self):
        if self.count == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered mid-run
        return original(self)

    monkeypatch.setattr(train_module._CountingStream, "__next__", next_then_kill)
    with pytest.raises(TrainingInterrupted, match=r"checkpoint saved to .*resume=True"):
        train_saes(cfg)
    monkeypatch.undo()
    state = json.loads((tmp_path / "interrupted" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["batches_consumed"] == 5 and state["n_training_steps"] == 4  # 1 batch went to norm estimation
    assert (
        signal.getsignal(signal.SIGTERM) is not None
        and not (tmp_path / "interrupted" / "blocks.2.hook_resid_post").exists()
    )

    with pytest.raises(ValueError, match="config differs"):
        train_saes(_small_cfg(tmp_path / "interrupted", k=4), resume=True)
    resumed = train_saes(cfg, resume=True)
    for hook in full:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(resumed[hook], name), getattr(full[hook], name), atol=1e-5, rtol=1e-4)
    assert not (tmp_path / "interrupted" / "checkpoints" / "latest").exists(), "finished runs leave no resumable state"
    with pytest.raises(ValueError, match="Nothing to resume"):
        train_saes(cfg, resume=True)
    assert isinstance(SAE.load_from_disk(tmp_path / "interrupted" / "blocks.4.hook_resid_post"), SAE)
