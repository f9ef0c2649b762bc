"""The on-disk activation cache: keyed by settings, resumable, checksummed, identical to a clean build."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_native
from torch.utils.data import Dataset

from sae_vision_ext import HookedViT
from sae_vision_ext.activations.cache import CachedActivations, CacheSettings, build_cache, dataset_fingerprint
from sae_vision_ext.cli import main

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


class RandomImages(Dataset):
    """Deterministic images; ``fail_at`` simulates a crash (a killed run) when that index is read."""

    fingerprint = "random-images-v1"

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_model(build_native("timm_registers"))


def settings(**kw) -> CacheSettings:
    base = dict(model_name="tiny", hook_names=HOOKS, dataset_fingerprint="random-images-v1", n_images=20,
                token_selection="no_registers", images_per_shard=6)  # fmt: skip
    return CacheSettings(**(base | kw))


def shard_tensors(folder, i):
    return CachedActivations(folder).load_shard(i) if (folder / "metadata.json").exists() else None


def test_cache_content_matches_live_harvest_and_is_reused(model, tmp_path):
    s = settings()
    folder = build_cache(model, RandomImages(20), s, tmp_path, image_batch_size=4, progress=False)
    meta = json.loads((folder / "metadata.json").read_text())
    assert folder.name == s.key and meta["complete"] and meta["n_shards"] == 4 and meta["n_images"] == 20
    assert meta["n_tokens"] == 20 * 17  # CLS + 16 patches, registers dropped
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.stack([RandomImages(20)[i] for i in range(6, 12)]), names_filter=list(HOOKS)
        )
    shard1 = CachedActivations(folder).load_shard(1)
    keep = [0, *range(4, 20)]
    for h in HOOKS:
        torch.testing.assert_close(shard1[h], cache[h][:, keep].flatten(0, 1))
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    build_cache(model, RandomImages(20), s, tmp_path, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".safetensors"} == {
        k: v for k, v in mtimes.items() if k.endswith(".safetensors")
    }, "identical settings reuse the shards"
    assert settings(token_selection="all").key != s.key and settings(dtype="float16").key != s.key


def test_killed_run_resumes_to_the_same_cache(model, tmp_path):
    s = settings(patches_per_image=5)
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, RandomImages(20, fail_at=14), s, tmp_path / "a", image_batch_size=4, progress=False)
    folder = tmp_path / "a" / s.key
    done = sorted(p.name for p in folder.glob("shard_*.json"))
    assert done == ["shard_00000.json", "shard_00001.json"], "complete shards survive, the torn one is not marked"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard_*.safetensors")}
    build_cache(model, RandomImages(20), s, tmp_path / "a", image_batch_size=4, progress=False)
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in before.items()), "nothing redone"
    clean = build_cache(model, RandomImages(20), s, tmp_path / "b", image_batch_size=6, progress=False)
    a, b = CachedActivations(folder), CachedActivations(clean)
    for i in range(4):
        for h in HOOKS:
            torch.testing.assert_close(a.load_shard(i)[h], b.load_shard(i)[h])


def test_corrupt_shard_is_detected(model, tmp_path):
    folder = build_cache(model, RandomImages(12), settings(n_images=12), tmp_path, progress=False)
    path = folder / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Checksum mismatch.*shard_00001"):
        CachedActivations(folder).load_shard(1)


def test_reader_yields_every_token_once_per_epoch_and_bf16_halves_bytes(model, tmp_path):
    f32 = build_cache(model, RandomImages(12), settings(n_images=12), tmp_path, progress=False)
    bf16 = build_cache(model, RandomImages(12), settings(n_images=12, dtype="bfloat16"), tmp_path, progress=False)
    reader = CachedActivations(f32)
    rows = torch.cat([b[HOOKS[0]] for b in reader.batches(batch_size=17, buffer_tokens=68, seed=3)])
    expected = torch.cat([reader.load_shard(i)[HOOKS[0]] for i in range(2)])
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows.sum(0), expected.sum(0), atol=1e-3, rtol=1e-5)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert 0.45 < size(bf16) / size(f32) < 0.55
    torch.testing.assert_close(CachedActivations(bf16).load_shard(0)[HOOKS[1]], reader.load_shard(0)[HOOKS[1]],
                               atol=0.05, rtol=0.02)  # fmt: skip


def test_in_memory_reader_shuffles_every_token_exactly_once_per_epoch(model, tmp_path):
    folder = build_cache(model, RandomImages(12), settings(n_images=12), tmp_path, progress=False)
    reader = CachedActivations(folder)
    tokens = torch.cat([reader.load_shard(i)[HOOKS[0]] for i in range(2)])
    n, bs = len(tokens), 16
    assert reader.nbytes > 0
    stream = reader.batches(batch_size=bs, seed=3, epochs=2, in_memory_bytes=reader.nbytes)
    epochs = torch.cat([b[HOOKS[0]] for b in stream]).split(n // bs * bs)
    assert len(epochs) == 2 and all(e.dtype == torch.float32 for e in epochs)
    for e in epochs:  # each row is a distinct cached token (the partial last batch dropped)
        match = (e[:, None, :] == tokens[None]).all(-1)
        assert (match.sum(1) == 1).all() and match.any(0).sum() == len(e)
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation each epoch
    again = torch.cat([b[HOOKS[0]] for b in reader.batches(batch_size=bs, seed=3, epochs=2, in_memory_bytes=10**12)])
    torch.testing.assert_close(again, torch.cat(epochs), rtol=0, atol=0)  # a function of the seed alone
    streamed = next(reader.batches(batch_size=bs, seed=3, in_memory_bytes=reader.nbytes - 1))
    assert not torch.equal(streamed[HOOKS[0]], epochs[0][:bs])  # one byte too big: the streaming path


def test_incomplete_or_missing_cache_errors(tmp_path):
    with pytest.raises(ValueError, match="not an activation cache"):
        CachedActivations(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"complete": False, "settings": {}}))
    with pytest.raises(ValueError, match=r"incomplete \(a run stopped early\); to finish it, rerun `sae-vision cache`"):
        CachedActivations(tmp_path)
    with pytest.raises(ValueError, match="Cannot fingerprint"):
        dataset_fingerprint(object(), 10, 0)
    assert dataset_fingerprint("sve:shapes", 10, 3) == "sve:shapes/seed=3"


def test_cli_cache_then_train_from_cache(tmp_path, capsys):
    common = ["--model", "sve:shapes-vit", "--layers", "2", "--n-images", "64", "--cache-dir",
              str(tmp_path / "cache"), "--cache-dtype", "float16"]  # fmt: skip
    assert main(["cache", *common]) == 0
    assert "cache ready" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", *common, "--training-tokens", "8192", "--train-batch-size", "512", "--k", "8",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    assert (out / "blocks.2.hook_resid_post" / "cfg.json").exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1, "train reused the cache built by `cache`"


def test_shards_get_the_same_mode_as_their_markers(model, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = build_cache(model, RandomImages(6), settings(n_images=6), tmp_path, progress=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_cli_verify_removes_bad_shards_and_rewrites_them_and_accepts_the_printed_key_folder(tmp_path, capsys):
    common = ["--model", "sve:shapes-vit", "--layers", "2", "--n-images", "600", "--cache-dir",
              str(tmp_path / "cache")]  # fmt: skip
    assert main(["cache", *common]) == 0
    key_dir = capsys.readouterr().out.split("cache ready: ")[-1].strip()
    shard = next(iter(sorted((tmp_path / "cache").glob("*/shard_00001.safetensors"))))
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    (shard.parent / "shard_00002.safetensors").unlink()
    assert main(["cache", *common[:-1], key_dir, "--verify"]) == 0  # the key folder it printed is accepted
    out = capsys.readouterr().out
    assert "Checksum mismatch" in out and "shard_00002.safetensors (or its marker) is missing" in out
    assert "2 bad shard(s) removed" in out and f"cache ready: {key_dir}" in out
    assert shard.read_bytes() == good  # rewritten deterministically
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [shard.parent.name], "no nested copy"


def test_a_corrupt_shard_met_in_training_checkpoints_first_then_names_the_shard(tmp_path):
    from sae_vision_ext._errors import CorruptShardError
    from sae_vision_ext.training.config import VisionSAETrainingConfig
    from sae_vision_ext.training.train import train_saes

    cfg = VisionSAETrainingConfig(model_name="sve:shapes-vit", layers=[2], n_images=512, images_per_shard=32,
                                  training_tokens=512 * 100, train_batch_size=512, shuffle_buffer_tokens=1024, k=8,
                                  expansion_factor=2, cache_dir=str(tmp_path / "cache"),
                                  output_dir=str(tmp_path / "run"), cache_in_memory_gb=0)  # fmt: skip
    train_saes(VisionSAETrainingConfig(**{**cfg.to_dict(), "training_tokens": 512, "output_dir": str(tmp_path / "w")}))
    # the reader visits shards in the order of its seeded permutation: damage the last one it reads
    last = torch.randperm(16, generator=torch.Generator().manual_seed(cfg.seed))[-1].item()
    shard = next(iter((tmp_path / "cache").glob(f"*/shard_{last:05d}.safetensors")))
    data = bytearray(shard.read_bytes())
    data[-9] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CorruptShardError, match=rf"shard_{last:05d}\.safetensors.*checkpoint saved to .*--resume"
    ) as err:
        train_saes(cfg)
    assert "sae-vision cache --verify" in str(err.value)
    state = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["n_training_steps"] > 0  # the steps done before the bad shard are kept
    # a cache small enough to be read into memory is read whole before the first step: same error
    in_memory = {**cfg.to_dict(), "cache_in_memory_gb": 2.0, "output_dir": str(tmp_path / "mem")}
    with pytest.raises(CorruptShardError, match=rf"shard_{last:05d}\.safetensors.*--resume"):
        train_saes(VisionSAETrainingConfig(**in_memory))
