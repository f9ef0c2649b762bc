"""Runs and files lose nothing and fail clearly: two runs into one folder, a full disk, a damaged or
newer ``state.json``, a moved run folder, damaged or deleted cache shards, a planted ``trainer_state.pt``,
impossible ``k`` and caches larger than the free space (tiny runs of the embedded ``sve:shapes-vit``)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_vision_ext._errors import CorruptShardError, TrainingInterrupted
from sae_vision_ext.activations.cache import CachedActivations
from sae_vision_ext.cli import main
from sae_vision_ext.training import checkpoints
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.train import train_saes

HOOK = "blocks.2.hook_resid_post"


def tiny_cfg(out: Path, **kw) -> VisionSAETrainingConfig:
    base = dict(model_name="sve:shapes-vit", layers=[2], n_images=64, training_tokens=512 * 6, train_batch_size=512,
                shuffle_buffer_tokens=2048, image_batch_size=32, expansion_factor=2, k=8, seed=1,
                output_dir=str(out))  # fmt: skip
    return VisionSAETrainingConfig(**(base | kw))


def run_child(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- lock

HOLD_LOCK = (
    "import sys, time\n"
    "from sae_vision_ext.training.checkpoints import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def case_lock_held_by_a_live_run(tmp_path, capsys, monkeypatch):
    proc = _holder(tmp_path / "run")
    try:
        lock = tmp_path / "run" / ".sae-vision-train.lock"
        with pytest.raises(ValueError, match=rf"Another training run \(pid {proc.pid}\).*holds {lock}"):
            train_saes(tiny_cfg(tmp_path / "run"))
        argv = ["train", "--model", "sve:shapes-vit", "--layers", "2", "--output-dir", str(tmp_path / "run")]
        assert main(argv) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def case_lock_of_a_killed_run_is_taken_over(tmp_path, capsys, monkeypatch):
    proc = _holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)  # a crash: the kernel drops the flock, the file stays
    proc.wait()
    lock = tmp_path / "run" / ".sae-vision-train.lock"
    assert lock.read_text().strip() == str(proc.pid)
    with pytest.warns(UserWarning, match=rf"stale lock .*\.sae-vision-train\.lock of pid {proc.pid}"):
        saes = train_saes(tiny_cfg(tmp_path / "run"))
    assert HOOK in saes and not lock.exists()


def case_lock_holds_our_pid_during_the_run_and_is_released(tmp_path, capsys, monkeypatch):
    import os

    lock = tmp_path / "run" / ".sae-vision-train.lock"
    seen = []
    original = checkpoints.CountingStream.__next__

    def spy(self):
        seen.append(lock.read_text().strip())
        if self.count == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(checkpoints.CountingStream, "__next__", spy)
    with pytest.raises(TrainingInterrupted):
        train_saes(tiny_cfg(tmp_path / "run"))
    monkeypatch.undo()
    assert set(seen) == {str(os.getpid())} and not lock.exists()
    train_saes(tiny_cfg(tmp_path / "run"), resume=True)  # the same process may take it again


LOCK_CASES = [case_lock_held_by_a_live_run, case_lock_of_a_killed_run_is_taken_over,
              case_lock_holds_our_pid_during_the_run_and_is_released]  # fmt: skip


@pytest.mark.parametrize("case", LOCK_CASES, ids=[c.__name__[5:] for c in LOCK_CASES])
def test_one_run_per_output_folder(case, tmp_path, capsys, monkeypatch):
    case(tmp_path, capsys, monkeypatch)


# ----------------------------------------------------------------------------------------- full disk

FILL_CACHE = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "from sae_vision_ext.activations import cache\n"
    "from sae_vision_ext.cli import main\n"
    "original, written = cache.atomic_write, []\n"
    "def limited(path, write):\n"
    "    if path.suffix == '.safetensors':\n"
    "        if len(written) == 2:  # the disk fills up after two shards\n"
    "            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
    "        written.append(path)\n"
    "    return original(path, write)\n"
    "cache.atomic_write = limited\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
FILL_TRAIN = (
    "import json, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "from sae_vision_ext.training import checkpoints\n"
    "from sae_vision_ext.training.config import VisionSAETrainingConfig\n"
    "from sae_vision_ext.training.train import train_saes\n"
    "after, done, original = int(sys.argv[2]), [], checkpoints.RunCheckpoint.save\n"
    "fill = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
    "def save(self, *args):\n"
    "    out = original(self, *args)\n"
    "    done.append(out)\n"
    "    if len(done) == after:\n"
    "        fill()\n"
    "    return out\n"
    "checkpoints.RunCheckpoint.save = save\n"
    "if after == 0:\n"
    "    fill()\n"
    "train_saes(VisionSAETrainingConfig.from_dict(json.load(open(sys.argv[1]))))\n"
)


def _error_line(stderr: str) -> str:
    """The exception line of a child's traceback (progress bars write to stderr too)."""
    return next(line for line in reversed(stderr.splitlines()) if line.startswith("sae_vision_ext._errors."))


def _cache_config(tmp_path: Path, **kw) -> Path:
    cfg = tiny_cfg(tmp_path / "run", cache_dir=str(tmp_path / "cache"), images_per_shard=16, **kw)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    return tmp_path / "cfg.json"


def case_disk_full_while_caching(tmp_path):
    res = run_child(FILL_CACHE, "cache", "--config", str(_cache_config(tmp_path)))
    assert res.returncode == 2, res.stderr[-2000:]
    folder = next((tmp_path / "cache").iterdir())
    assert "Traceback" not in res.stderr
    assert f"The disk is full: writing shard_00002.safetensors in {folder} failed" in res.stderr
    assert "2 of 4 shards (" in res.stderr and "MB) are written and kept" in res.stderr
    assert "the whole cache needs about 2.1 MB" in res.stderr and "rerun `sae-vision cache`" in res.stderr
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard_*.safetensors")}
    assert sorted(kept) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert main(["cache", "--config", str(tmp_path / "cfg.json")]) == 0  # resumes at shard 2
    assert all((folder / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert len(CachedActivations(folder).verify_shards()) == 0


def case_disk_full_at_the_first_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", checkpoint_every_tokens=512)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    res = run_child(FILL_TRAIN, str(tmp_path / "cfg.json"), "0")
    assert res.returncode == 1
    last = _error_line(res.stderr)
    assert last.startswith("sae_vision_ext._errors.DiskFullError: The disk is full: writing the checkpoint ")
    assert re.search(r"checkpoint .*step_1 failed after [\d.]+ k?B of about [\d.]+ kB \(weights and optimiser", last)
    assert "the partial checkpoint was removed" in last and "no earlier checkpoint of this run exists" in last
    assert not (tmp_path / "run" / "checkpoints").exists(), "no partial checkpoint left behind"


def case_disk_full_at_a_later_checkpoint_keeps_the_earlier_one(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", checkpoint_every_tokens=512)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    res = run_child(FILL_TRAIN, str(tmp_path / "cfg.json"), "1")
    assert res.returncode == 1
    last = _error_line(res.stderr)
    state_file = tmp_path / "run" / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_file.read_text())
    assert f"the checkpoint at step {state['n_training_steps']} ({state_file}) is kept" in last
    assert "--resume" in last
    assert [p.name for p in state_file.parent.glob("step_*")] == [state["folder"]]
    saes = train_saes(cfg, resume=True)
    assert HOOK in saes and not (tmp_path / "run" / "checkpoints").exists()


DISK_CASES = [case_disk_full_while_caching, case_disk_full_at_the_first_checkpoint,
              case_disk_full_at_a_later_checkpoint_keeps_the_earlier_one]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", DISK_CASES, ids=[c.__name__[5:] for c in DISK_CASES])
def test_a_full_disk_is_named_and_what_was_written_is_kept(case, tmp_path):
    """A real write failure: ``RLIMIT_FSIZE`` in a child process (``SIGXFSZ`` ignored) makes the kernel
    refuse the write with ``EFBIG``, as a full disk refuses with ``ENOSPC``."""
    case(tmp_path)


# ------------------------------------------------------------------------------------- resume state


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[VisionSAETrainingConfig, Path]:
    """A run stopped by SIGTERM after a few steps, with its checkpoint (copied by each test)."""
    import os

    out = tmp_path_factory.mktemp("interrupted") / "run"
    cfg = tiny_cfg(out)
    original = checkpoints.CountingStream.__next__

    def next_then_term(self):
        if self.count == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints.CountingStream, "__next__", next_then_term)
        with pytest.raises(TrainingInterrupted):
            train_saes(cfg)
    return cfg, out


def _copy(interrupted, tmp_path: Path) -> tuple[VisionSAETrainingConfig, Path, Path]:
    cfg, out = interrupted
    shutil.copytree(out, tmp_path / "run")
    cfg = VisionSAETrainingConfig.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "run")})
    return cfg, tmp_path / "run", tmp_path / "run" / "checkpoints" / "latest" / "state.json"


def _edit_state(state_file: Path, edit) -> None:
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))


class _Planted:
    """Unpickling this runs a shell command: what a tampered ``trainer_state.pt`` could hold."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def _plant(run: Path, state_file: Path, cfg):
    (path,) = run.glob("checkpoints/latest/step_*/*/trainer_state.pt")
    torch.save({"optimizer": _Planted(str(run / "PWNED"))}, path)
    return cfg


REFUSALS = [
    ("newer-format-version", lambda run, sf, cfg: _edit_state(sf, lambda s: s.update(format_version=99)) or cfg,
     r"state\.json has format_version 99, newer than this sae_vision_ext reads \(1\).*without --resume"),
    ("corrupt-state-json", lambda run, sf, cfg: [sf.write_text('{"folder": "step_'), cfg][1],
     r"Cannot read the checkpoint state .*latest/state\.json: .*corrupt"),
    ("state-lacks-a-field", lambda run, sf, cfg: _edit_state(sf, lambda s: s.pop("batches_consumed")) or cfg,
     r"checkpoint state .*state\.json lacks \['batches_consumed'\]"),
    ("planted-trainer-state", _plant,
     r"Refusing to resume from .*step_\d+/blocks\.2\.hook_resid_post/trainer_state\.pt.*Weights only load failed"),
    ("differing-field-named", lambda run, sf, cfg: VisionSAETrainingConfig(**{**cfg.to_dict(), "k": 4}),
     r"config differs from the interrupted run's \(saved in .*state\.json\) in k: 8 there, 4 here"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_resume_refuses_a_bad_checkpoint_naming_the_file(interrupted, tmp_path, damage, message, monkeypatch):
    cfg, run, state_file = _copy(interrupted, tmp_path)
    cfg = damage(run, state_file, cfg)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load unsafe unless told otherwise
    with pytest.raises(ValueError, match=message):
        train_saes(cfg, resume=True)
    assert not (run / "PWNED").exists()


def _moved(interrupted, tmp_path):
    cfg, run, _ = _copy(interrupted, tmp_path)
    moved = run.rename(tmp_path / "moved elsewhere")
    return VisionSAETrainingConfig.from_dict({**cfg.to_dict(), "output_dir": str(moved)}), moved


def _paths_differ(interrupted, tmp_path):
    cfg, run, state_file = _copy(interrupted, tmp_path)  # as if written elsewhere with another cache folder
    _edit_state(state_file, lambda s: s["config"].update(cache_dir="/old/place/cache", output_dir="/old/place/run"))
    return cfg, run


RESUMES = [("moved-run-folder", _moved), ("only-path-fields-differ", _paths_differ)]


@pytest.mark.parametrize("prepare", [r[1] for r in RESUMES], ids=[r[0] for r in RESUMES])
def test_resume_ignores_paths_and_state_records_its_format_version(interrupted, tmp_path, prepare):
    cfg, run = prepare(interrupted, tmp_path)
    saes = train_saes(cfg, resume=True)
    assert HOOK in saes and (run / HOOK / "cfg.json").exists() and not (run / "checkpoints").exists()
    state = json.loads((interrupted[1] / "checkpoints" / "latest" / "state.json").read_text())
    assert state["format_version"] == checkpoints.STATE_FORMAT_VERSION == 1


# ------------------------------------------------------------------------------------- cache shards


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-shard cache built by ``sae-vision cache`` (copied by each test) and its config file."""
    tmp = tmp_path_factory.mktemp("cache")
    cfg_file = _cache_config(tmp)
    assert main(["cache", "--config", str(cfg_file)]) == 0
    return tmp, cfg_file


def _copy_cache(built_cache, tmp_path: Path) -> tuple[Path, Path]:
    tmp, cfg_file = built_cache
    shutil.copytree(tmp / "cache", tmp_path / "cache")
    cfg = json.loads(cfg_file.read_text()) | {"cache_dir": str(tmp_path / "cache")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return next((tmp_path / "cache").iterdir()), tmp_path / "cfg.json"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _pad(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 64)


@pytest.mark.parametrize("damage", [_truncate, _pad], ids=["truncated-shard", "padded-shard"])
def test_cache_is_ready_only_once_every_shard_has_its_size(built_cache, tmp_path, capsys, caplog, damage):
    folder, cfg_file = _copy_cache(built_cache, tmp_path)
    shard = folder / "shard_00001.safetensors"
    good = shard.read_bytes()
    damage(shard)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="sae_vision_ext.activations.shards"):
        assert main(["cache", "--config", str(cfg_file)]) == 0
    assert re.search(r"rewriting a damaged cache shard: .*shard_00001\.safetensors has \d+ bytes", caplog.text)
    assert f"cache ready: {folder}" in capsys.readouterr().out
    assert shard.read_bytes() == good


def _delete_shard(folder: Path, cfg_file: Path) -> None:
    (folder / "shard_00002.safetensors").unlink()
    CachedActivations(folder).batches(64)


def _train_from_deleted(folder: Path, cfg_file: Path) -> None:
    (folder / "shard_00002.safetensors").unlink()
    train_saes(VisionSAETrainingConfig.from_file(cfg_file))


def _read_incomplete(folder: Path, cfg_file: Path) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({"settings": meta["settings"], "complete": False}))
    CachedActivations(folder)


SHARD_ERRORS = [
    ("deleted-shard-read", _delete_shard, CorruptShardError,
     r"shard_00002\.safetensors is missing; to rewrite it, rerun `sae-vision cache` .* build_cache\(\.\.\.\)"),
    ("deleted-shard-in-training", _train_from_deleted, CorruptShardError,
     r"shard_00002\.safetensors is missing; .*`sae-vision cache`"),
    ("incomplete-cache-names-cli-and-api", _read_incomplete, ValueError,
     r"is incomplete \(a run stopped early\); to finish it, rerun `sae-vision cache` .* or build_cache\(\.\.\.\)"),
]  # fmt: skip


@pytest.mark.parametrize(("act", "error", "message"), [r[1:] for r in SHARD_ERRORS], ids=[r[0] for r in SHARD_ERRORS])
def test_missing_shards_name_the_shard_and_the_fix(built_cache, tmp_path, act, error, message):
    folder, cfg_file = _copy_cache(built_cache, tmp_path)
    with pytest.raises(error, match=message):
        act(folder, cfg_file)


def test_cli_verify_finishes_an_incomplete_cache(built_cache, tmp_path, capsys):
    folder, cfg_file = _copy_cache(built_cache, tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({"settings": meta["settings"], "complete": False}))
    (folder / "shard_00003.safetensors").unlink()  # a run killed before its last shard
    (folder / "shard_00003.json").unlink()
    shard = folder / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200] + bytes([shard.read_bytes()[200] ^ 0xFF]) + shard.read_bytes()[201:])
    capsys.readouterr()
    assert main(["cache", "--config", str(cfg_file), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "1 bad shard(s) removed" in out and f"cache ready: {folder}" in out
    assert "Checksum mismatch" in out and "rerun `sae-vision cache`" in out
    assert CachedActivations(folder).verify_shards() == []


# ----------------------------------------------------------------------------- checks before work


def _k_too_large(tmp_path, monkeypatch):
    argv = ["train", "--model", "sve:shapes-vit", "--layers", "2", "--k", "1000000", "--cache-dir",
            str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run")]  # fmt: skip
    return (
        argv,
        r"blocks\.2\.hook_resid_post: k=1000000 is larger than its d_sae=512 \(expansion_factor 4\.0 x d_in 128",
    )


def _cache_over_free_space(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    argv = ["cache", "--model", "sve:shapes-vit", "--layers", "2", "--n-images", "64", "--cache-dir",
            str(tmp_path / "cache")]  # fmt: skip
    return argv, r"Cache .*\(1 shards to write\) needs about 2\.1 MB but .* has 1\.0 kB free"


EARLY = [("k-over-d_sae", _k_too_large), ("cache-over-free-space", _cache_over_free_space)]


@pytest.mark.parametrize("setup", [r[1] for r in EARLY], ids=[r[0] for r in EARLY])
def test_impossible_runs_are_refused_before_any_harvest(setup, tmp_path, capsys, monkeypatch):
    argv, message = setup(tmp_path, monkeypatch)
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list((tmp_path / "cache").rglob("shard_*")), "nothing was harvested"


def test_cache_announces_its_size_and_the_free_space(tmp_path, capsys, caplog):
    argv = ["cache", "--model", "sve:shapes-vit", "--layers", "2", "--n-images", "64", "--cache-dir",
            str(tmp_path / "cache")]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sae_vision_ext.activations.shards"):
        assert main(argv) == 0
    out = capsys.readouterr().out  # 64 images x 65 tokens x 128 x 4 bytes
    assert re.search(r"about 2\.1 MB for 64 images x 65 tokens x 1 hook\(s\) in float32; [\d.]+ [kMGT]B free", out)
    assert re.search(r"writing 1 shards, about 2\.1 MB, [\d.]+ [kMGT]B free", caplog.text)


# ------------------------------------------------------------------------------ after a finished run


def test_a_finished_run_leaves_no_checkpoint_folder_or_lock(tmp_path):
    out = tmp_path / "run"
    train_saes(tiny_cfg(out, checkpoint_every_seconds=1e-3))  # a checkpoint at every step
    assert sorted(p.name for p in out.iterdir()) == [HOOK, "training_config.json"]
