"""VisionSAETrainingConfig and train_saes: SAELens-format output that plain SAELens loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sae_vision_ext.activations.harvest import harvest
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.train import train_saes

BAD_CONFIGS = [
    ({"architecture": "topk2"}, r"Unknown SAELens training architecture 'topk2'\. Did you mean 'topk'"),
    ({"token_selection": "patch"}, r"token_selection='patch' is not valid; choose one of \['all'"),
    ({"k": 0}, "k must be positive, got 0"),
    ({"k": 16.5}, "k must be a whole number, got 16.5"),
    ({"lr": "fast"}, "lr must be a number, got the string 'fast'"),
    ({"training_tokens": [1]}, r"training_tokens must be a number, got \[1\]"),
    ({"d_sae": 8, "k": 16}, "k=16 is larger than d_sae=8"),
    ({"device": "gpu"}, r"device='gpu' is not a torch device \(did you mean 'cuda'\?\)"),
    ({"b_dec_init": "median"}, r"b_dec_init='median' is not valid"),
    ({"checkpoint_every_seconds": 0}, "checkpoint_every_seconds must be positive or None"),
    (
        {"per_layer": {"blocks.0.hook_resid_post": {"kk": 3}}},
        r"per_layer\['blocks.0.hook_resid_post'\] has unknown keys",
    ),
    (
        {"per_layer": {"blocks.0.hook_resid_post": {"k": 2.5}}},
        r"per_layer\['blocks.0.hook_resid_post'\]\['k'\] must be a whole",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_CONFIGS, ids=[str(f) for f, _ in BAD_CONFIGS])
def test_bad_config_values_are_refused_at_construction_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionSAETrainingConfig(**fields)


def test_numeric_strings_from_yaml_are_converted_and_unknown_keys_named():
    import yaml

    cfg = VisionSAETrainingConfig.from_dict(yaml.safe_load("lr: 4e-4\ntraining_tokens: 1e5\nk: '8'\n"))
    assert (cfg.lr, cfg.training_tokens, cfg.k) == (4e-4, 100_000, 8)
    assert isinstance(cfg.training_tokens, int) and isinstance(cfg.lr, float)
    with pytest.raises(ValueError, match=r"Unknown VisionSAETrainingConfig keys \['lrr'\]"):
        VisionSAETrainingConfig.from_dict({"lrr": 1.0})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"hook_names": ["blocks.1.hook_resid_pots"]},
            r"Unknown hook of sve:shapes-vit 'blocks.1.hook_resid_pots'\. Did you mean 'blocks.1.hook_resid_post'",
        ),
        (
            {"layers": [1], "per_layer": {"blocks.2.hook_resid_post": {"k": 4}}},
            r"per_layer names 'blocks.2.hook_resid_post', which this run does not train.*'blocks.1.hook_resid_post'",
        ),
        ({"layers": [1], "device": "cuda"}, "torch sees no CUDA device here; use device='cpu'"),
    ],
)
def test_train_time_checks_name_the_hook_or_device(fields, message, monkeypatch):
    from sae_vision_ext import HookedViT
    from sae_vision_ext.activations.harvest import resolve_hook_names
    from sae_vision_ext.training.train import check_hooks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a machine with a GPU
    cfg = VisionSAETrainingConfig(**fields)
    model = HookedViT.from_pretrained("sve:shapes-vit")
    with pytest.raises(ValueError, match=message):
        check_hooks(cfg, model, resolve_hook_names(cfg.hook_names, model.cfg.n_layers, cfg.layers))


def test_seed_paper_preset_is_the_papers_table():
    cfg = VisionSAETrainingConfig.seed_paper("vit")
    assert cfg.per_layer["blocks.0.hook_resid_post"] == {"k": 4, "d_sae": 192}
    assert cfg.per_layer["blocks.7.hook_resid_post"] == {"k": 160, "d_sae": 3072}
    assert (cfg.normalize_activations, cfg.k_aux, cfg.aux_coefficient, cfg.lr) == ("layer_norm", 256, 1 / 32, 2e-4)
    assert cfg.layers == list(range(11)) and cfg.dead_feature_window_tokens == 60 * cfg.train_batch_size
    assert cfg.model_name == "timm:vit_base_patch16_224"


def test_config_round_trips_through_yaml_and_json(tmp_path):
    import yaml

    cfg = VisionSAETrainingConfig(k=8, layers=[0, 2], per_layer={"blocks.2.hook_resid_post": {"k": 16}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert VisionSAETrainingConfig.from_file(tmp_path / "c.yaml") == cfg
    assert VisionSAETrainingConfig.from_file(tmp_path / "c.json") == cfg
    assert cfg.for_hook("blocks.2.hook_resid_post", "k") == 16 and cfg.for_hook("blocks.0.hook_resid_post", "k") == 8
    assert cfg.lr_end_for(512) == pytest.approx(cfg.lr_for(512) / 10)


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


@pytest.mark.slow
def test_sigterm_checkpoint_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    import os
    import signal

    from sae_lens import SAE
    from safetensors.torch import load_file

    from sae_vision_ext._errors import TrainingInterrupted
    from sae_vision_ext.training import checkpoints as train_module

    full = train_saes(_small_cfg(tmp_path / "full"))
    sparsity = load_file(tmp_path / "full" / "blocks.2.hook_resid_post" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (256,)

    cfg = _small_cfg(tmp_path / "interrupted")
    original = train_module.CountingStream.__next__

    def next_then_kill(self):
        if self.count == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered mid-run
        return original(self)

    monkeypatch.setattr(train_module.CountingStream, "__next__", next_then_kill)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"checkpoint saved to .*resume=True"):
        train_saes(cfg)
    monkeypatch.undo()
    state = json.loads((tmp_path / "interrupted" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["batches_consumed"] == 5 and state["n_training_steps"] == 4  # 1 batch went to norm estimation
    assert signal.getsignal(signal.SIGTERM) == handler_before  # our handler is removed again
    assert not (tmp_path / "interrupted" / "blocks.2.hook_resid_post").exists()

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


def test_output_folder_published_as_a_hub_repo_loads_with_plain_saelens(trained, tmp_path):
    """``train_saes``'s output folder, uploaded as is to a Hub repo (here: laid out in a local Hub cache
    exactly as ``huggingface_hub`` stores a download, read offline), loads with plain SAELens
    ``SAE.from_pretrained("<org>/<repo>", "<hook name>")``; docs/saes.md "Publishing" says so."""
    import shutil

    cfg, saes = trained
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sve-test--shapes-vit-saes"
    shutil.copytree(cfg.output_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    x = torch.randn(6, 128)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from sae_lens import SAE\n"
        "sae = SAE.from_pretrained('sve-test/shapes-vit-saes', 'blocks.4.hook_resid_post')\n"
        "assert 'sae_vision_ext' not in sys.modules\n"
        f"torch.save(sae.encode(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'out.pt')!r})\n"
        "print(type(sae).__name__, sae.cfg.k, sae.cfg.metadata.hook_name)\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["TopKSAE", "24", "blocks.4.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), saes["blocks.4.hook_resid_post"].encode(x))


@pytest.mark.slow
def test_sigkill_mid_run_loses_at_most_one_interval_and_resume_equals_uninterrupted(tmp_path):
    """A real ``kill -9`` of a training process after a periodic checkpoint; ``resume=True`` then ends
    with the SAEs of an uninterrupted run. The child only sleeps between batches (so the kill lands
    mid-run); it trains with the same code and config."""
    import signal
    import time

    full = train_saes(_small_cfg(tmp_path / "full"))
    cfg = _small_cfg(tmp_path / "killed", checkpoint_every_tokens=512 * 2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    child = (
        "import json, sys, time\n"
        "from sae_vision_ext.training import checkpoints\n"
        "from sae_vision_ext.training.config import VisionSAETrainingConfig\n"
        "from sae_vision_ext.training.train import train_saes\n"
        "original = checkpoints.CountingStream.__next__\n"
        "def slow(self):\n    time.sleep(0.4)\n    return original(self)\n"
        "checkpoints.CountingStream.__next__ = slow\n"
        "train_saes(VisionSAETrainingConfig.from_dict(json.load(open(sys.argv[1]))))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "cfg.json")])
    state_file = tmp_path / "killed" / "checkpoints" / "latest" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["n_training_steps"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the child finished before it could be killed"
    time.sleep(0.5)  # past the checkpoint: the kill lands between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(state_file.read_text())
    assert state["n_training_steps"] >= 4 and (state_file.parent / state["folder"]).is_dir()
    assert not (tmp_path / "killed" / "blocks.2.hook_resid_post").exists()
    resumed = train_saes(cfg, resume=True)
    for hook in full:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(resumed[hook], name), getattr(full[hook], name), atol=1e-5, rtol=1e-4)
    assert not state_file.parent.exists()


class _Planted:
    """Unpickling this runs a shell command: what a tampered ``trainer_state.pt`` could hold."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_resume_reads_trainer_state_with_weights_only_so_a_planted_file_cannot_run_code(tmp_path, monkeypatch):
    import os
    import signal

    from sae_vision_ext._errors import TrainingInterrupted
    from sae_vision_ext.training import checkpoints

    cfg = _small_cfg(tmp_path / "run")
    original = checkpoints.CountingStream.__next__

    def next_then_term(self):
        if self.count == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(checkpoints.CountingStream, "__next__", next_then_term)
    with pytest.raises(TrainingInterrupted):
        train_saes(cfg)
    monkeypatch.undo()
    states = list((tmp_path / "run" / "checkpoints" / "latest").glob("step_*/*/trainer_state.pt"))
    assert states
    marker = tmp_path / "PWNED"
    torch.save({"optimizer": _Planted(str(marker))}, states[0])
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # makes torch.load unsafe unless told otherwise
    with pytest.raises(Exception, match="Weights only load failed"):
        train_saes(cfg, resume=True)
    assert not marker.exists()
