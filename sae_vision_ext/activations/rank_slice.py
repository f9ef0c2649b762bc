"""One data-parallel rank's slice of a cache: rows ``[rank·b, (rank+1)·b)`` of every global batch, and
only those rows read from disk.

The global batches are those a one-process reader yields (``CachedActivations.batches``), planned on
token ids instead of activations: the same seeded generator draws the same permutations (in-memory
mode: one exact shuffle per epoch; streaming mode: shards in a seeded order through a
:class:`~.harvest.ShuffleBuffer`, whose draws depend only on how many tokens it holds), so the plan
costs 8 bytes a token and equals the one-process order exactly. A rank then reads its ids' rows
from the memory-mapped shards (:class:`RowReader`): over an epoch the ranks read disjoint sets of
tokens whose union is the cache, and the activations equal the one-process run's bit for bit.

In-memory mode reads a rank's rows of a whole epoch at its start (``1/world`` of the cache in
memory), streaming mode each batch's rows as it is drawn. Shard ``i``'s checksum is verified by rank
``i mod world`` alone (the harvest's owner), so every byte is hashed once per run.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._errors import CorruptShardError
from .harvest import ShuffleBuffer
from .shards import REBUILD_HINT, marker_path, sha256_file, shard_path

if TYPE_CHECKING:
    import numpy as np

    from .cache import CachedActivations

_NUMPY_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16"}  # bfloat16: bits, viewed by torch


class RowReader:
    """Rows of a cache's shards by global token id (shard ``i`` holds ids ``offsets[i]:offsets[i+1]``),
    through memory maps of at most ``max_open`` shards at a time. ``tokens_read`` counts rows read."""

    def __init__(
        self, cache: CachedActivations, hooks: list[str], *, rank: int = 0, world: int = 1, max_open: int = 32
    ) -> None:
        self.cache, self.hooks, self.rank, self.world, self.max_open = cache, hooks, rank, world, max_open
        n_shards = int(cache.metadata["n_shards"])
        counts = [json.loads(marker_path(cache.folder, i).read_text())["n_tokens"] for i in range(n_shards)]
        self.offsets = torch.tensor([0, *counts]).cumsum(0)
        self.tokens_read = 0
        self._maps: OrderedDict[int, dict[str, np.memmap]] = OrderedDict()

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def shard_ids(self, i: int) -> Tensor:
        return torch.arange(int(self.offsets[i]), int(self.offsets[i + 1]))

    def read(self, ids: Tensor) -> dict[str, Tensor]:
        """``{hook: [len(ids), d]}`` float32, row ``j`` the token ``ids[j]``."""
        shard_of = torch.searchsorted(self.offsets, ids, right=True) - 1
        out: dict[str, Tensor] = {}
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            rows = (ids[where] - self.offsets[s]).numpy()
            for h, arr in self._open(s).items():
                part = torch.from_numpy(arr[rows])
                if arr.dtype.name == "uint16":
                    part = part.view(torch.bfloat16)
                if h not in out:
                    out[h] = torch.empty(len(ids), arr.shape[1], dtype=torch.float32)
                out[h][where] = part.float()
        self.tokens_read += len(ids)
        return out

    def _open(self, i: int) -> dict[str, np.memmap]:
        if i in self._maps:
            self._maps.move_to_end(i)
            return self._maps[i]
        path, marker = shard_path(self.cache.folder, i), marker_path(self.cache.folder, i)
        if not path.exists():
            raise CorruptShardError(f"Cache shard {path} is missing; to rewrite it, {REBUILD_HINT}.")
        if self.cache.verify and i % self.world == self.rank and i not in self.cache._verified:
            if sha256_file(path) != json.loads(marker.read_text())["sha256"]:
                raise CorruptShardError(
                    f"Checksum mismatch in {path}: the shard is corrupt; to rewrite it, {REBUILD_HINT}."
                )
            self.cache._verified.add(i)
        self._maps[i] = memory_map(path, self.hooks)
        if len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return self._maps[i]


def memory_map(path: Path, names: list[str]) -> dict[str, np.memmap]:
    """Read-only memory maps of tensors ``names`` of a safetensors file (its documented layout: an
    8-byte little-endian header length, the JSON header, then the data), without reading the data."""
    import numpy as np

    try:
        with open(path, "rb") as fd:
            n = int.from_bytes(fd.read(8), "little")
            header: dict[str, Any] = json.loads(fd.read(n))
        maps = {}
        for name in names:
            entry = header[name]
            begin = 8 + n + entry["data_offsets"][0]
            maps[name] = np.memmap(path, _NUMPY_DTYPES[entry["dtype"]], "r", begin, tuple(entry["shape"]))
        return maps
    except (OSError, ValueError, KeyError) as e:
        raise CorruptShardError(f"Cache shard {path} cannot be read ({type(e).__name__}: {e}).") from e


def global_batch_ids(
    reader: RowReader,
    batch_size: int,
    buffer_tokens: int,
    gen: torch.Generator,
    *,
    epochs: int | None,
    in_memory: bool,
) -> Iterator[Tensor]:
    """The token ids of each global batch, in the order ``CachedActivations.batches`` yields them."""
    n = reader.n_tokens
    epoch = 0
    if in_memory:
        if n < batch_size:
            raise ValueError(f"Cache {reader.cache.folder} holds {n} tokens, fewer than one batch of {batch_size}.")
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=gen)
            yield from perm[: n // batch_size * batch_size].view(-1, batch_size)
            epoch += 1
        return

    def shards() -> Iterator[dict[str, Tensor]]:
        nonlocal epoch
        while epochs is None or epoch < epochs:
            for i in torch.randperm(len(reader.offsets) - 1, generator=gen).tolist():
                yield {"id": reader.shard_ids(i)}
            epoch += 1

    for batch in ShuffleBuffer(max(buffer_tokens, 2 * batch_size), batch_size, gen)(shards()):
        yield batch["id"]


def rank_batches(
    reader: RowReader,
    batch_size: int,
    buffer_tokens: int,
    gen: torch.Generator,
    *,
    epochs: int | None,
    in_memory: bool,
) -> Iterator[dict[str, Tensor]]:
    """Rank ``reader.rank``'s ``batch_size / world`` rows of every global batch, reading only those."""
    b = batch_size // reader.world
    lo, hi = reader.rank * b, (reader.rank + 1) * b
    plan = global_batch_ids(reader, batch_size, buffer_tokens, gen, epochs=epochs, in_memory=in_memory)
    if not in_memory:
        for ids in plan:
            yield reader.read(ids[lo:hi])
        return
    per_epoch = reader.n_tokens // batch_size
    while True:  # one read per epoch: this rank's rows of all its batches
        mine = [ids[lo:hi] for _, ids in zip(range(per_epoch), plan, strict=False)]
        if not mine:
            return
        rows = reader.read(torch.cat(mine))
        for j in range(len(mine)):
            yield {h: t[j * b : (j + 1) * b] for h, t in rows.items()}
