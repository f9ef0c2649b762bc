"""data_parallel: true on two gloo processes equals one process with the same global batch (to 1e-5),
for TopK with AuxK active and for layer_norm; a rank killed with SIGKILL loses at most one interval."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sae_vision_ext.launch import spawn_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HOOK = "blocks.1.hook_resid_post"


def _config(tmp, name, cache, **over) -> str:
    cfg = {"model_name": "sve:shapes-vit", "dataset": "sve:shapes", "n_images": 24, "images_per_shard": 8,
           "hook_names": [HOOK], "cache_dir": str(cache), "output_dir": str(tmp / name), "k": 8,
           "expansion_factor": 2.0, "training_tokens": 128 * 24, "train_batch_size": 128,
           "shuffle_buffer_tokens": 1024, "token_selection": "patches", "patches_per_image": 32, "seed": 2,
           "dead_feature_window_tokens": 256, "checkpoint_every_seconds": None, **over}  # fmt: skip
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _train_rank(rank, world, port, cfg_path, resume, kill_at):
    """A rank of ``sae-vision train`` (``kill_at``: rank 1 SIGKILLs itself before that batch)."""
    if kill_at and rank == 1:
        from sae_vision_ext.training import checkpoints

        original = checkpoints.CountingStream.__next__

        def next_or_die(self):
            if self.count == kill_at:
                os.kill(os.getpid(), 9)
            return original(self)

        checkpoints.CountingStream.__next__ = next_or_die
    from sae_vision_ext.launch import cli_rank

    cli_rank(rank, world, port, ["train", "--config", cfg_path, *(["--resume"] if resume else [])], 1)


def _run(cfg_path, nprocs, resume=False, kill_at=0):
    return spawn_ranks(_train_rank, nprocs, (cfg_path, resume, kill_at), 240)


def _weights(tmp, name):
    out = load_file(tmp / name / HOOK / "sae_weights.safetensors")
    out["sparsity"] = load_file(tmp / name / HOOK / "sparsity.safetensors")["sparsity"]
    return out


@pytest.mark.parametrize("norm", ["expected_average_only_in", "layer_norm"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, norm):
    cache = tmp_path / "cache"
    assert _run(_config(tmp_path, "one", cache, normalize_activations=norm), 1) == [0]
    assert _run(_config(tmp_path, "dp", cache, normalize_activations=norm, data_parallel=True), 2) == [0, 0]
    one, dp = _weights(tmp_path, "one"), _weights(tmp_path, "dp")
    assert (one["sparsity"] < -9).any()  # features died inside the window: AuxK trained them
    assert one.keys() == dp.keys()
    for key in one:
        torch.testing.assert_close(dp[key], one[key], atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "dp" / "checkpoints").exists()


def test_sigkill_of_a_rank_then_resume_loses_at_most_one_interval(tmp_path):
    cache = tmp_path / "cache"
    every = 4 * 128  # a checkpoint every 4 global batches
    cfg = _config(tmp_path, "dp", cache, data_parallel=True, checkpoint_every_tokens=every)
    codes = _run(cfg, 2, kill_at=15)
    assert codes[1] == -9 and codes[0] != 0  # rank 0 fails at the next all-reduce
    state = json.loads((tmp_path / "dp" / "checkpoints" / "latest" / "state_data_parallel_2.json").read_text())
    assert 15 - state["batches_consumed"] <= every // 128 and state["n_training_steps"] > 0
    assert _run(cfg, 2, resume=True) == [0, 0]
    assert _run(_config(tmp_path, "one", cache), 1) == [0]
    one, dp = _weights(tmp_path, "one"), _weights(tmp_path, "dp")
    for key in one:
        torch.testing.assert_close(dp[key], one[key], atol=1e-5, rtol=1e-5)
