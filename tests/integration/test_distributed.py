"""Two gloo processes on CPU: distributed harvest and layer-parallel training equal one process."""

from __future__ import annotations

import json

import pytest
import torch
from _dist_workers import run_two, run_with_dying_rank, signalled_rank
from safetensors.torch import load_file

from sae_vision_ext.cli import main
from sae_vision_ext.launch import launch_local

pytestmark = pytest.mark.distributed

HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.2.hook_resid_post"


def config(tmp, cache, out, n_images=48) -> str:
    cfg = {"model_name": "sve:shapes-vit", "dataset": "sve:shapes", "n_images": n_images, "images_per_shard": 8,
           "hook_names": HOOKS.split(","), "cache_dir": str(cache), "output_dir": str(out), "k": 8,
           "expansion_factor": 2.0, "training_tokens": 6144, "train_batch_size": 256, "shuffle_buffer_tokens": 2048,
           "token_selection": "patches", "patches_per_image": 24, "seed": 3}  # fmt: skip
    path = tmp / f"cfg-{cache.name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def shards(folder):
    return {p.name: load_file(p) for p in sorted(folder.glob("shard_*.safetensors"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference: cache and SAEs (threads pinned like the workers')."""
    tmp = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", config(tmp, tmp / "cache", tmp / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    (folder,) = (tmp / "cache").iterdir()
    return tmp, folder


def test_two_process_harvest_equals_one_process(single, tmp_path):
    _, ref = single
    codes = launch_local(["cache", "--config", config(tmp_path, tmp_path / "cache", tmp_path / "out")], 2, 1, 120)
    assert codes == [0, 0]
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name == ref.name  # same settings hash: one cache whatever the world size
    meta, ref_meta = (json.loads((f / "metadata.json").read_text()) for f in (folder, ref))
    assert meta["complete"] and meta["n_tokens"] == ref_meta["n_tokens"] == 48 * 24
    a, b = shards(folder), shards(ref)
    assert list(a) == list(b) and len(a) == 6
    for name in a:
        for hook in a[name]:
            assert torch.equal(a[name][hook], b[name][hook]), (name, hook)


def test_killed_rank_then_rerun_completes_with_nothing_duplicated(single, tmp_path):
    _, ref = single
    argv = ["cache", "--config", config(tmp_path, tmp_path / "cache", tmp_path / "out")]
    codes = run_with_dying_rank(argv, kill_after_shards=1)
    assert codes[1] == 3 and codes[0] != 0  # rank 1 died; rank 0 could not finish the barrier
    (folder,) = (tmp_path / "cache").iterdir()
    assert not json.loads((folder / "metadata.json").read_text())["complete"]
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard_*.safetensors")}
    assert "shard_00001.safetensors" in done and "shard_00003.safetensors" not in done  # rank 1 wrote one shard
    assert launch_local(argv, 2, 1, 120) == [0, 0]
    for name, mtime in done.items():  # complete shards were not rewritten
        assert (folder / name).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary files
    a, b = shards(folder), shards(ref)
    assert list(a) == list(b)
    assert all(torch.equal(a[n][h], b[n][h]) for n in a for h in a[n])
    assert json.loads((folder / "metadata.json").read_text())["n_tokens"] == 48 * 24


def test_layer_parallel_training_equals_one_process(single, tmp_path):
    ref_tmp, _ = single
    codes = launch_local(["train", "--config", config(tmp_path, tmp_path / "cache", tmp_path / "out")], 2, 1, 120)
    assert codes == [0, 0]
    for hook in HOOKS.split(","):
        ours = load_file(tmp_path / "out" / hook / "sae_weights.safetensors")
        ref = load_file(ref_tmp / "out" / hook / "sae_weights.safetensors")
        assert ours.keys() == ref.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "out" / "checkpoints" / "latest").exists()
    assert (tmp_path / "out" / "training_config.json").exists()


def test_layer_parallel_training_interrupted_on_every_rank_resumes_to_the_same_saes(single, tmp_path):
    ref_tmp, _ = single
    argv = ["train", "--config", config(tmp_path, tmp_path / "cache", tmp_path / "out")]
    assert run_two(signalled_rank, argv, 4) == [130, 130]  # both checkpointed, at different steps
    latest = tmp_path / "out" / "checkpoints" / "latest"
    states = {p.name: json.loads(p.read_text())["batches_consumed"] for p in latest.glob("state_rank*.json")}
    assert set(states) == {"state_rank0_of_2.json", "state_rank1_of_2.json"}
    assert states["state_rank0_of_2.json"] != states["state_rank1_of_2.json"]
    assert not (tmp_path / "out" / "blocks.0.hook_resid_post").exists()  # nothing final written yet
    assert launch_local([*argv, "--resume"], 2, 1, 120) == [0, 0]
    for hook in HOOKS.split(","):
        ours = load_file(tmp_path / "out" / hook / "sae_weights.safetensors")
        ref = load_file(ref_tmp / "out" / hook / "sae_weights.safetensors")
        for key in ours:
            torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-4)
    assert not latest.exists()


def test_distributed_flag_needs_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["cache", "--distributed", "--config", config(tmp_path, tmp_path / "cache", tmp_path / "out")]
    assert main(argv) == 2
    assert "torchrun" in capsys.readouterr().err
