"""On-disk activation cache: sharded, checksummed, memory-mapped, resumable, keyed by its settings.

Layout under ``root/<key>/`` where ``key`` is a hash of the settings in ``metadata.json`` (model id,
hooks, token selection, patch subsampling, dtype, dataset fingerprint, image count, images per
shard, seed), so identical settings reuse a cache and different settings never collide::

    metadata.json             settings, plus token counts and "complete": true when finished
    shard_00000.safetensors   one tensor per hook, [n_tokens, d], in the cache dtype
    shard_00000.json          {"n_tokens", "n_images", "sha256", "nbytes"}: written last, marks the shard complete

Shard ``i`` holds images ``[i * images_per_shard, (i + 1) * images_per_shard)`` in dataset order,
so a killed run resumes at the first shard without a ``.json`` and redoes nothing else. Under
``torchrun`` shard ``i`` belongs to rank ``i mod world_size`` (``sae_vision_ext.distributed``);
rank 0 writes the final metadata once every marker exists, so the cache equals a one-process one. Each shard
is written to a temporary name and renamed; its checksum is verified when read. Readers open
shards through safetensors (memory-mapped), visit them in a seeded random order and mix tokens
in a :class:`~sae_vision_ext.activations.harvest.ShuffleBuffer`.

Before writing, ``build_cache`` logs the estimated size and the free space and refuses an estimate
larger than the free space; a full disk mid-run raises ``DiskFullError`` (the shards written are kept,
a rerun resumes). A finished cache is only called ready once every shard's size matches its header
and marker (a truncated shard is rewritten); the checksum is checked on read (or by ``--verify``).

Compared with SAELens's ``CacheActivationsRunner``: that writes a Hugging Face ``datasets`` table
of token activations for one hook per run from a text dataset; this writes every hook from one
image pass, keeps image order for resumption, and checks shard integrity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .._errors import CorruptShardError
from .._io import atomic_write, atomic_write_text
from .disk import is_disk_full
from .harvest import ShuffleBuffer, TokenSelection, collate_pixels, harvest, to_device
from .shards import (
    REBUILD_HINT,
    disk_full_error,
    marker_path,
    plan_cache_space,
    sha256_file,
    shard_path,
    shards_to_write,
)

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from ..models.hooked_vit import HookedViT

logger = logging.getLogger(__name__)
CacheDtype = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheSettings:
    """Everything that determines a cache's content (hashed into its directory name)."""

    model_name: str
    hook_names: tuple[str, ...]
    dataset_fingerprint: str
    n_images: int
    token_selection: TokenSelection = "all"
    patches_per_image: int | None = None
    dtype: CacheDtype = "float32"
    images_per_shard: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown cache dtype {self.dtype!r}; valid: {tuple(_DTYPES)}.")
        if self.images_per_shard <= 0 or self.n_images <= 0:
            raise ValueError(
                f"n_images and images_per_shard must be positive, got {self.n_images}, {self.images_per_shard}."
            )

    @property
    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.images_per_shard)


def dataset_fingerprint(source: str | Path | Dataset, n_images: int, seed: int) -> str:
    """A stable id of an image source: the shapes set's seed, or a hash of a folder's file list."""
    from ..data.sources import SOURCES

    if isinstance(source, str) and source in SOURCES:  # registered sources are functions of their seed
        return f"{source}/seed={seed}"
    path = Path(str(source))
    if isinstance(source, (str, Path)) and path.exists():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{int(st.st_mtime)}".encode())
        return f"folder:{h.hexdigest()[:16]}"
    fp = getattr(source, "fingerprint", None)
    if fp is None:
        raise ValueError(
            f"Cannot fingerprint a {type(source).__name__}: give it a `fingerprint` string attribute "
            "(anything that changes when its images change) so caches of different data never collide."
        )
    return str(fp)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def build_cache(
    model: HookedViT,
    dataset: Dataset,
    settings: CacheSettings,
    root: str | Path,
    num_workers: int = 0,
    *,
    image_batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write (or finish) the cache for ``settings`` under ``root``; return its directory.

    ``dataset`` yields preprocessed image tensors (see ``data.sources.open_image_source``). Complete
    shards are kept; the rest are written. Safe to interrupt at any point. In a process group every
    rank must call this; each writes its own shards (see the module docstring).
    """
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from ..distributed import barrier, owned, rank_and_world_size

    rank, world = rank_and_world_size()
    root = cache_root(root, settings)
    folder = root / settings.key
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "metadata.json"
    if rank == 0 and not meta_path.exists():
        _write_json(meta_path, {"settings": asdict(settings), "complete": False})
    dtype = _DTYPES[settings.dtype]
    gen = torch.Generator().manual_seed(settings.seed)
    mine = owned(range(settings.n_shards), rank, world)
    todo = shards_to_write(folder, mine)
    total = plan_cache_space(model, settings, folder, todo)
    desc = f"cache {settings.key}" + (f" rank {rank}/{world}" if world > 1 else "")
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="shard", disable=not progress or rank != 0
    )
    t0, tokens = time.perf_counter(), 0
    for shard in todo:
        start = shard * settings.images_per_shard
        stop = min(start + settings.images_per_shard, settings.n_images, len(dataset))
        gen.manual_seed(settings.seed * 1_000_003 + shard)  # subsampling depends on the shard only
        loader = DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=image_batch_size,
            num_workers=num_workers,
            collate_fn=collate_pixels,  # images of mixed sizes (NaFlex) stay a list
        )
        device = next(model.parameters()).device
        parts: dict[str, list[Tensor]] = {h: [] for h in settings.hook_names}
        batches = (to_device(b, device) for b in loader)
        for chunk in harvest(
            model,
            batches,
            list(settings.hook_names),
            settings.token_selection,
            settings.patches_per_image,
            generator=gen,
        ):
            for h, t in chunk.items():
                parts[h].append(t.to("cpu", dtype))
        tensors = {h: torch.cat(v).contiguous() for h, v in parts.items()}
        n_tokens = next(iter(tensors.values())).shape[0]
        final = shard_path(folder, shard)
        try:
            atomic_write(final, lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
            record = {"n_tokens": n_tokens, "n_images": stop - start, "sha256": sha256_file(final)}
            _write_json(marker_path(folder, shard), {**record, "nbytes": final.stat().st_size})
        except Exception as e:
            if not is_disk_full(e):
                raise
            bar.close()
            raise disk_full_error(e, folder, shard, settings, total) from e
        tokens += n_tokens
        bar.update(1)
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    barrier()  # every rank's shards are written (a dead rank makes this raise on the others)
    if rank == 0:
        missing = [i for i in range(settings.n_shards) if not marker_path(folder, i).exists()]
        if missing:
            raise ValueError(
                f"Cache {folder} lacks shards {missing[:8]}{'...' if len(missing) > 8 else ''}: "
                "a process stopped early. Rerun the same command to write only those."
            )
        records = [json.loads(marker_path(folder, i).read_text()) for i in range(settings.n_shards)]
        meta = {
            "settings": asdict(settings),
            "complete": True,
            "n_tokens": sum(r["n_tokens"] for r in records),
            "n_images": sum(r["n_images"] for r in records),
            "n_shards": settings.n_shards,
        }
        _write_json(meta_path, meta)
    barrier()  # the metadata is complete before anyone reads the cache
    return folder


class CachedActivations:
    """Reads a complete cache: ``batches(batch_size)`` yields shuffled ``{hook: [batch, d]}`` (float32)."""

    def __init__(self, folder: str | Path, verify: bool = True, *, allow_incomplete: bool = False) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "metadata.json"
        if not meta_path.exists():
            raise ValueError(f"{self.folder} is not an activation cache (no metadata.json).")
        self.metadata = json.loads(meta_path.read_text())
        if not self.metadata.get("complete") and not allow_incomplete:
            raise ValueError(f"Cache {self.folder} is incomplete (a run stopped early); to finish it, {REBUILD_HINT}.")
        self.settings = self.metadata["settings"]
        if "n_shards" not in self.metadata:  # an incomplete cache: the shards its settings call for
            self.metadata["n_shards"] = -(-self.settings["n_images"] // self.settings["images_per_shard"])
        self.hook_names: list[str] = list(self.settings["hook_names"])
        self.verify = verify
        self._verified: set[int] = set()  # each shard's checksum is checked on its first read in this process

    @property
    def n_tokens(self) -> int:
        return int(self.metadata["n_tokens"])

    def load_shard(self, i: int, hooks: list[str] | None = None, as_float: bool = True) -> dict[str, Tensor]:
        """Shard ``i`` as float32 tensors of ``hooks`` (default all; ``as_float=False``: in the cache
        dtype); its checksum is verified on the first read in this reader unless ``verify=False``."""
        from safetensors import safe_open

        path, marker = shard_path(self.folder, i), marker_path(self.folder, i)
        if not path.exists() or not marker.exists():
            raise CorruptShardError(f"Cache shard {path} (or its marker) is missing; to rewrite it, {REBUILD_HINT}.")
        record = json.loads(marker.read_text())
        if self.verify and i not in self._verified:
            if sha256_file(path) != record["sha256"]:
                raise CorruptShardError(
                    f"Checksum mismatch in {path}: the shard is corrupt; to rewrite it, {REBUILD_HINT}."
                )
            self._verified.add(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {h: f.get_tensor(h).float() if as_float else f.get_tensor(h) for h in (hooks or self.hook_names)}
        except Exception as e:
            raise CorruptShardError(f"Cache shard {path} cannot be read ({type(e).__name__}: {e}).") from e

    def verify_shards(self, remove: bool = False) -> list[str]:
        """Every shard's presence and checksum; the problems found (``remove``: delete bad shards and their
        markers, and mark the cache incomplete, so ``build_cache`` rewrites exactly those)."""
        problems = []
        for i in range(int(self.metadata["n_shards"])):
            if not self.metadata.get("complete") and not shard_path(self.folder, i).exists():
                continue  # an incomplete cache: not written yet (build_cache writes it)
            try:
                self.load_shard(i, hooks=self.hook_names[:1])
            except CorruptShardError as e:
                problems.append(str(e))
                if remove:
                    shard_path(self.folder, i).unlink(missing_ok=True)
                    marker_path(self.folder, i).unlink(missing_ok=True)
        if problems and remove:
            _write_json(self.folder / "metadata.json", {**self.metadata, "complete": False})
        return problems

    def batches(
        self,
        batch_size: int,
        buffer_tokens: int = 65_536,
        seed: int = 0,
        epochs: int | None = 1,
        *,
        hooks: list[str] | None = None,
        in_memory_bytes: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[dict[str, Tensor]]:
        """Shuffled training batches (float32). A cache of at most ``in_memory_bytes`` on disk is read
        into memory once, and each epoch is an exact shuffle of all its tokens (a batch is one gather);
        a larger one streams: shards in a seeded random order per epoch, tokens mixed in a buffer of
        ``buffer_tokens``. ``hooks`` (default all) selects the tensors read; the token order does not
        depend on it. Either way the order is a function of ``seed`` alone (so a resumed run replays it).
        ``world > 1`` (data-parallel): rows ``[rank·b, (rank+1)·b)`` of each of those batches, ``b =
        batch_size / world``, and only those rows are read from disk (``rank_slice.py``)."""
        unknown = sorted(set(hooks or []) - set(self.hook_names))
        if unknown:
            raise ValueError(f"Hooks {unknown} are not in cache {self.folder}; it holds {self.hook_names}.")
        gen = torch.Generator().manual_seed(seed)
        n_shards = int(self.metadata["n_shards"])
        if world > 1:
            from .rank_slice import RowReader, rank_batches

            if batch_size % world or not 0 <= rank < world:
                raise ValueError(
                    f"rank {rank} of {world} with batch_size={batch_size}: the batch must divide evenly over the "
                    "ranks and the rank be in [0, world); make batch_size a multiple of the world size."
                )
            reader = RowReader(self, hooks or self.hook_names, rank=rank, world=world)
            in_memory = self.nbytes <= in_memory_bytes
            return rank_batches(reader, batch_size, buffer_tokens, gen, epochs=epochs, in_memory=in_memory)
        if self.nbytes <= in_memory_bytes:
            return self._in_memory_batches(batch_size, gen, epochs, hooks)

        def shards() -> Iterator[dict[str, Tensor]]:
            epoch = 0
            while epochs is None or epoch < epochs:
                for i in torch.randperm(n_shards, generator=gen).tolist():
                    yield self.load_shard(i, hooks)
                epoch += 1

        return ShuffleBuffer(max(buffer_tokens, 2 * batch_size), batch_size, gen)(shards())

    @property
    def nbytes(self) -> int:
        """Size of the shards on disk (what reading the cache into memory takes, in its dtype)."""
        paths = [shard_path(self.folder, i) for i in range(int(self.metadata["n_shards"]))]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise CorruptShardError(
                f"Cache shard {missing[0]} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; to rewrite it, {REBUILD_HINT}."
            )
        return sum(p.stat().st_size for p in paths)

    def _in_memory_batches(
        self, batch_size: int, gen: torch.Generator, epochs: int | None, hooks: list[str] | None
    ) -> Iterator[dict[str, Tensor]]:
        loaded = [self.load_shard(i, hooks, as_float=False) for i in range(int(self.metadata["n_shards"]))]
        tokens = {h: torch.cat([shard[h] for shard in loaded]) for h in loaded[0]}
        del loaded
        n = next(iter(tokens.values())).shape[0]
        if n < batch_size:
            raise ValueError(f"Cache {self.folder} holds {n} tokens, fewer than one batch of {batch_size}.")
        epoch = 0
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch_size + 1, batch_size):  # the last partial batch of an epoch is dropped
                idx = perm[i : i + batch_size]
                yield {h: t[idx].float() for h, t in tokens.items()}
            epoch += 1


def cache_root(path: str | Path, settings: CacheSettings) -> Path:
    """The root for ``settings``: ``path`` itself, or its parent when ``path`` is the key folder that
    ``sae-vision cache`` printed (``ValueError`` if that folder holds a cache of other settings)."""
    path = Path(path)
    meta = path / "metadata.json"
    if not meta.exists():
        return path
    theirs = json.loads(meta.read_text()).get("settings", {})
    if path.name == settings.key:
        return path.parent
    diff = {k: (theirs.get(k), v) for k, v in asdict(settings).items() if theirs.get(k) != v and k != "hook_names"}
    raise ValueError(
        f"{path} is the cache of other settings (differing: {diff or 'hooks'}); pass the folder above it as "
        "cache_dir, or the same settings."
    )


def warn_if_near_miss(root: Path, settings: CacheSettings) -> None:
    """Log which settings differ when ``root`` holds caches but none for ``settings`` (a new one is built)."""
    mine = asdict(settings)
    for meta in sorted(root.glob("*/metadata.json")):
        theirs = json.loads(meta.read_text()).get("settings", {})
        diff = {k: f"{theirs.get(k)!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v}
        if len(diff) <= 2:
            logger.warning(
                "building a new cache %s beside %s, whose settings differ only in %s",
                settings.key,
                meta.parent.name,
                diff,
            )


def open_or_build_cache(
    model: HookedViT, dataset: Dataset, settings: CacheSettings, root: str | Path, **kwargs: Any
) -> CachedActivations:
    root = cache_root(root, settings)
    folder = root / settings.key
    meta = folder / "metadata.json"
    if not meta.exists():
        warn_if_near_miss(root, settings)
    if not (meta.exists() and json.loads(meta.read_text()).get("complete")):
        build_cache(model, dataset, settings, root, **kwargs)
    return CachedActivations(folder)
