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


def _record_reads(rank, folder):
    """Record every cache read of this rank: the token ids of each ``RowReader.read`` call, and any whole
    shard loaded (``reads_rank{r}.pt``)."""
    from sae_vision_ext.activations import rank_slice
    from sae_vision_ext.activations.cache import CachedActivations

    calls, shards = [], []
    read, load_shard = rank_slice.RowReader.read, CachedActivations.load_shard

    def save():
        torch.save({"calls": calls, "shards": shards}, f"{folder}/reads_rank{rank}.pt")

    def recording_read(self, ids):
        calls.append(ids.clone())
        save()
        return read(self, ids)

    def recording_load(self, i, *args, **kwargs):
        shards.append(i)
        save()
        return load_shard(self, i, *args, **kwargs)

    rank_slice.RowReader.read, CachedActivations.load_shard = recording_read, recording_load


def _train_rank(rank, world, port, cfg_path, resume, kill_at, record=None):
    """A rank of ``sae-vision train`` (``kill_at``: rank 1 SIGKILLs itself before that batch, or SIGTERMs
    itself when negative; ``record``: a folder for the rank's record of cache reads)."""
    if record:
        _record_reads(rank, record)
    if kill_at and rank == 1:
        import signal

        from sae_vision_ext.training import checkpoints

        original = checkpoints.CountingStream.__next__

        def next_or_die(self):
            if self.count == abs(kill_at):
                os.kill(os.getpid(), 9 if kill_at > 0 else signal.SIGTERM)
            return original(self)

        checkpoints.CountingStream.__next__ = next_or_die
    from sae_vision_ext.launch import cli_rank

    cli_rank(rank, world, port, ["train", "--config", cfg_path, *(["--resume"] if resume else [])], 1)


def _run(cfg_path, nprocs, resume=False, kill_at=0, record=None):
    return spawn_ranks(_train_rank, nprocs, (cfg_path, resume, kill_at, record), 240)


def _weights(tmp, name):
    out = load_file(tmp / name / HOOK / "sae_weights.safetensors")
    out["sparsity"] = load_file(tmp / name / HOOK / "sparsity.safetensors")["sparsity"]
    return out


@pytest.mark.parametrize(
    ("norm", "in_memory_gb"), [("expected_average_only_in", 2.0), ("layer_norm", 2.0), ("layer_norm", 0.0)]
)
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, norm, in_memory_gb):
    """In-memory (2 GB) and streamed (0) cache reading; each rank reads only its disjoint slice."""
    over = dict(normalize_activations=norm, cache_in_memory_gb=in_memory_gb)
    if not in_memory_gb:  # a buffer of a third of the cache: the first 4 batches hold first-epoch tokens only
        over["shuffle_buffer_tokens"] = 256
    cache = tmp_path / "cache"
    assert _run(_config(tmp_path, "one", cache, **over), 1) == [0]
    assert _run(_config(tmp_path, "dp", cache, **over, data_parallel=True), 2, record=tmp_path) == [0, 0]
    reads = [torch.load(tmp_path / f"reads_rank{r}.pt") for r in (0, 1)]
    assert reads[0]["shards"] == reads[1]["shards"] == []  # no rank read a whole shard
    assert len(reads[0]["calls"]) == len(reads[1]["calls"]) > 0
    n_tokens = 24 * 32
    for a, b in zip(reads[0]["calls"], reads[1]["calls"], strict=True):  # one epoch's (or one batch's) rows
        assert len(a) == len(b) == (n_tokens // 2 if in_memory_gb else 64)
        if in_memory_gb:  # each epoch: disjoint halves, together every token of the cache
            assert not set(a.tolist()) & set(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == n_tokens
    if not in_memory_gb:  # streamed: the first epoch's batches (before the buffer mixes in the next) read once
        first = torch.cat(
            [torch.cat([a, b]) for a, b in zip(reads[0]["calls"][:4], reads[1]["calls"][:4], strict=True)]
        )
        assert first.unique().numel() == first.numel() == 4 * 128
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


def test_sigterm_on_one_rank_stops_both_at_one_step_then_resume_equals_one_rank(tmp_path):
    """The stop request rides on the step's all-reduce: both ranks stop at the same batch boundary."""
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, "dp", cache, data_parallel=True)
    assert _run(cfg, 2, kill_at=-12) == [130, 130]  # both interrupted, checkpointed by rank 0
    state = json.loads((tmp_path / "dp" / "checkpoints" / "latest" / "state_data_parallel_2.json").read_text())
    assert 12 <= state["batches_consumed"] <= 13  # the step after the signal (its flag rides on that step)
    assert _run(cfg, 2, resume=True) == [0, 0]
    assert _run(_config(tmp_path, "one", cache), 1) == [0]
    one, dp = _weights(tmp_path, "one"), _weights(tmp_path, "dp")
    for key in one:
        torch.testing.assert_close(dp[key], one[key], atol=1e-5, rtol=1e-5)
