"""A data-parallel rank's slice of the cache (activations/rank_slice.py): the rows of every global batch
a one-process reader yields, each rank reading only its own (counted), in both reading modes and dtypes."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native
from torch.utils.data import Dataset

from sae_vision_ext import HookedViT
from sae_vision_ext.activations import rank_slice
from sae_vision_ext.activations.cache import CachedActivations, CacheSettings, build_cache

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


class RandomImages(Dataset):
    fingerprint = "random-images-rank-slice"

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_model(build_native("timm_registers"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_ranks_read_disjoint_rows_that_make_up_the_one_process_batches(model, tmp_path, monkeypatch, dtype, in_memory):
    s = CacheSettings(model_name="tiny", hook_names=HOOKS, dataset_fingerprint=RandomImages.fingerprint, n_images=20,
                      token_selection="no_registers", images_per_shard=6, dtype=dtype)  # fmt: skip
    folder = build_cache(model, RandomImages(), s, tmp_path, image_batch_size=4, progress=False)
    n = 20 * 17
    assert CachedActivations(folder).n_tokens == n
    # streaming: one epoch (the buffer carries tokens over an epoch boundary, so two epochs' copies of a token
    # can meet in one batch)
    kw = dict(batch_size=40, buffer_tokens=100, seed=3, epochs=2 if in_memory else 1,
              in_memory_bytes=2**30 if in_memory else 0)  # fmt: skip
    one = list(CachedActivations(folder).batches(**kw))
    assert len(one) == (2 * (n // 40) if in_memory else n // 40)
    read: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    real = rank_slice.RowReader.read

    def counting_read(self, ids):
        read[self.rank].append(ids.clone())
        return real(self, ids)

    monkeypatch.setattr(rank_slice.RowReader, "read", counting_read)
    monkeypatch.setattr(CachedActivations, "load_shard", lambda *a, **k: pytest.fail("a rank read a whole shard"))
    ranks = [list(CachedActivations(folder).batches(**kw, rank=r, world=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [len(one), len(one)]
    for j, batch in enumerate(one):
        for h in HOOKS:  # the one-process batch is rank 0's rows then rank 1's, bit for bit
            assert torch.equal(torch.cat([ranks[0][j][h], ranks[1][j][h]]), batch[h])
    per_rank = [torch.cat(read[r]) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [20 * len(one)] * 2  # half of every batch each, nothing more
    if in_memory:  # one read per epoch and rank: disjoint, together every token of the epoch
        assert len(read[0]) == len(read[1]) == 2
        for e in range(2):
            a, b = set(read[0][e].tolist()), set(read[1][e].tolist())
            assert not a & b and len(a) == len(b) == (n // 40) * 20 and len(a | b) == n // 40 * 40
    else:  # one read per batch; over the epoch every token read once, by one rank (bar the last partial batch)
        assert len(read[0]) == len(read[1]) == len(one)
        a, b = set(per_rank[0].tolist()), set(per_rank[1].tolist())
        assert not a & b and len(a | b) == len(one) * 40 == n // 40 * 40
        assert torch.bincount(torch.cat(per_rank), minlength=n).max() == 1


def test_a_corrupt_shard_is_found_by_the_rank_that_owns_it(model, tmp_path):
    s = CacheSettings(model_name="tiny", hook_names=HOOKS, dataset_fingerprint=RandomImages.fingerprint, n_images=20,
                      token_selection="no_registers", images_per_shard=6)  # fmt: skip
    folder = build_cache(model, RandomImages(), s, tmp_path, image_batch_size=4, progress=False)
    path = folder / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert next(iter(CachedActivations(folder).batches(40, 100, rank=0, world=2, in_memory_bytes=2**30)))
    with pytest.raises(Exception, match=r"Checksum mismatch in .*shard_00001"):
        next(iter(CachedActivations(folder).batches(40, 100, rank=1, world=2, in_memory_bytes=2**30)))
