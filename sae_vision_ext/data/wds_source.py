"""``wds:<pattern>``: webdataset tar shards as an image source (the ``webdataset`` package).

``pattern`` is brace-expanded (``/data/train-{000000..000127}.tar``, ``file:`` urls, and streams that
webdataset's ``gopen`` opens: ``pipe:<command>``, ``http(s)://``, ``s3://`` and the like). Two views of
the same shards, in the same order (shard by shard, members in tar order, one sample per key):

- :class:`WebDatasetImages`, a map-style ``Dataset`` (what the activation cache and ``image_batches``
  read): opening it reads every shard's tar headers once (``tarfile``) into an index of
  ``(shard, key, image member, label)``; ``dataset[i]`` seeks to the member's bytes. The cache then
  splits images across ranks by cache shard and a ``DataLoader`` splits them across workers.
  It seeks into local shards only: with a streamed shard in the pattern (``pipe:``, a network url)
  its map-style methods raise ``ValueError`` naming the shard and the fixes (local copies, or
  ``stream: true``), and opening it reads nothing.
- :meth:`WebDatasetImages.stream` (:class:`WebDatasetStream`), an ``IterableDataset`` built on
  ``webdataset.WebDataset`` for streaming: shard ``j`` goes to the global worker
  ``j mod (world_size × num_workers)`` (rank-major), so every image is read exactly once over all
  ranks and workers; ``start_shard`` resumes at a shard boundary.

Corrupt data (a damaged tar header, an image that does not decode) raise ``ValueError`` naming the
shard and member with ``on_error="raise"`` (the default). With ``on_error="skip"`` the run goes on
(the map-style view then decodes every image once when it is opened and leaves out those that fail):
each skipped member is counted (``skipped``: ``[(shard, member, reason)]`` on the map-style view,
``skipped_count()`` per process on the stream) and a ``UserWarning`` states the count, so nothing is
dropped unreported.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

OnError = Literal["raise", "skip"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
LABEL_EXTENSIONS = ("cls", "cls2", "label", "class")


@dataclass(frozen=True)
class _Member:
    shard: int
    key: str
    offset: int
    size: int
    name: str
    label: int | None


def expand_urls(pattern: str) -> list[str]:
    """The shard urls of a brace pattern, in order; ``ValueError`` when it expands to nothing."""
    import braceexpand

    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"wds:{pattern} expands to no shard.")
    return urls


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _open_local(url: str) -> Any:
    path = url[len("file:") :] if url.startswith("file:") else url
    return open(path, "rb")


def _undecodable(url: str, info: tarfile.TarInfo) -> str | None:
    """Why the image member ``info`` of shard ``url`` does not decode (``None`` if it does)."""
    from PIL import Image

    with _open_local(url) as fh:
        fh.seek(info.offset_data)
        data = fh.read(info.size)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _is_remote(url: str) -> bool:
    """Read through webdataset's ``gopen`` as a stream: ``pipe:`` commands, urls of a scheme but ``file:``."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def _stream_only(pattern: str, url: str) -> ValueError:
    return ValueError(
        f"wds:{pattern}: shard {url!r} is read as a stream (a pipe: command or a network url, through webdataset's "
        "gopen), but this map-style view (what the activation cache and evaluation read) seeks into each shard's "
        "tar members, which a stream cannot do. Either copy the shards to local disk and pass their path (or "
        "file:) pattern, or train with stream: true and cache_dir: null (`sae-vision train --stream`), which reads "
        "remote shards in order through gopen."
    )


class WebDatasetImages(Dataset):
    """Map-style view of webdataset shards: every sample with an image member, in shard order."""

    def __init__(
        self,
        pattern: str,
        transform: Callable[[Any], Tensor],
        on_error: OnError = "raise",
        image_key: str | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} is not valid; choose 'raise' or 'skip'.")
        self.pattern, self.transform, self.on_error, self.image_key = pattern, transform, on_error, image_key
        self.urls = expand_urls(pattern)
        self.skipped: list[tuple[str, str, str]] = []
        self.members: list[_Member] = []
        self.shard_sizes: list[int] = []
        self.remote = next((u for u in self.urls if _is_remote(u)), None)
        if self.remote is not None:  # only .stream() reads these; the map-style methods raise _stream_only
            return
        for shard, url in enumerate(self.urls):
            found = self._index(shard, url)
            self.members += found
            self.shard_sizes.append(len(found))
        if self.skipped:
            warnings.warn(
                f"wds:{pattern}: skipped {len(self.skipped)} corrupt member(s) (on_error='skip'); first: "
                f"{self.skipped[0]}",
                stacklevel=2,
            )
        if not self.members:
            raise ValueError(f"wds:{pattern}: no sample with an image ({', '.join(IMAGE_EXTENSIONS)}) in its shards.")

    def _problem(self, url: str, member: str, reason: str) -> None:
        if self.on_error == "raise":
            raise ValueError(
                f"Corrupt webdataset member {member!r} in shard {url}: {reason}. Repair or drop the shard, or "
                "open the source with on_error='skip' (counted and reported)."
            )
        self.skipped.append((url, member, reason))

    def _index(self, shard: int, url: str) -> list[_Member]:
        """The samples of one shard from its tar headers (labels read from their small members)."""
        samples: dict[str, dict[str, Any]] = {}
        with _open_local(url) as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = _split_name(info.name)
                        entry = samples.setdefault(key, {})
                        if ext in LABEL_EXTENSIONS:
                            entry["label"] = tar.extractfile(info).read()
                        elif (self.image_key and ext == self.image_key) or (
                            not self.image_key and ext in IMAGE_EXTENSIONS
                        ):
                            entry.setdefault("image", info)
            except (tarfile.TarError, OSError) as e:
                self._problem(url, "(tar header)", f"{type(e).__name__}: {e}")
        out = []
        for key, entry in samples.items():
            if "image" not in entry:
                continue
            info = entry["image"]
            if self.on_error == "skip" and (reason := _undecodable(url, info)) is not None:
                self._problem(url, info.name, reason)  # skip mode checks every image once, when opened
                continue
            label = entry.get("label")
            out.append(
                _Member(shard, key, info.offset_data, info.size, info.name, None if label is None else int(label))
            )
        return out

    def _require_local(self) -> None:
        if self.remote is not None:
            raise _stream_only(self.pattern, self.remote)

    def __len__(self) -> int:
        self._require_local()
        return len(self.members)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        self._require_local()
        m = self.members[i]
        with _open_local(self.urls[m.shard]) as fh:
            fh.seek(m.offset)
            data = fh.read(m.size)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return self.transform(im.convert("RGB"))
        except Exception as e:  # a member that does not decode: never a silent substitute
            raise ValueError(
                f"Corrupt webdataset member {m.name!r} in shard {self.urls[m.shard]}: {type(e).__name__}: {e}."
            ) from e

    def labels(self, n: int | None = None) -> tuple[Tensor, list[str]]:
        """Labels of the first ``n`` samples (their ``.cls`` members) and class names ``"0".."max"``."""
        self._require_local()
        ids = [m.label for m in self.members[: len(self) if n is None else n]]
        if any(v is None for v in ids):
            raise ValueError(f"wds:{self.pattern}: some samples have no label member ({', '.join(LABEL_EXTENSIONS)}).")
        return torch.tensor(ids, dtype=torch.long), [str(c) for c in range(max(ids) + 1)]

    @property
    def fingerprint(self) -> str:
        """Changes when a shard's name, size or member list changes."""
        self._require_local()
        h = hashlib.sha256()
        for m in self.members:
            h.update(f"{self.urls[m.shard]}:{m.name}:{m.offset}:{m.size}".encode())
        return f"wds:{h.hexdigest()[:16]}"

    def stream(
        self, rank: int = 0, world_size: int = 1, start_shard: int = 0, with_keys: bool = False
    ) -> WebDatasetStream:
        """The iterable view of the same shards for ``rank`` of ``world_size`` (see the module docstring)."""
        return WebDatasetStream(
            self.urls,
            self.transform,
            rank,
            world_size,
            start_shard=start_shard,
            on_error=self.on_error,
            image_key=self.image_key,
            with_keys=with_keys,
        )


_SKIPPED = [0]  # per process: members skipped by WebDatasetStream with on_error="skip"


def skipped_count() -> int:
    """Members this process skipped while streaming with ``on_error="skip"``."""
    return _SKIPPED[0]


class WebDatasetStream(IterableDataset):
    """``webdataset.WebDataset`` over the shards of one rank and DataLoader worker (module docstring)."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[Any], Tensor],
        rank: int = 0,
        world_size: int = 1,
        *,
        start_shard: int = 0,
        on_error: OnError = "raise",
        image_key: str | None = None,
        with_keys: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}); got {rank}.")
        if not 0 <= start_shard <= len(urls):
            raise ValueError(f"start_shard must be in [0, {len(urls)}]; got {start_shard}.")
        self.urls, self.transform, self.rank, self.world_size = urls, transform, rank, world_size
        self.start_shard, self.on_error, self.image_key, self.with_keys = start_shard, on_error, image_key, with_keys

    def my_shards(self, worker: int = 0, n_workers: int = 1) -> list[int]:
        """Shard indices of global worker ``rank * n_workers + worker`` from ``start_shard`` on."""
        total = self.world_size * n_workers
        me = self.rank * n_workers + worker
        return [j for j in range(self.start_shard, len(self.urls)) if j % total == me]

    def _handler(self, exn: Exception) -> bool:
        if self.on_error == "raise":
            raise ValueError(f"Corrupt webdataset data: {type(exn).__name__}: {exn}") from exn
        _SKIPPED[0] += 1
        warnings.warn(f"skipped a corrupt webdataset member ({type(exn).__name__}: {exn})", stacklevel=2)
        return True

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        urls = [self.urls[j] for j in self.my_shards(worker, n_workers)]
        if not urls:
            return
        keys = (self.image_key,) if self.image_key else IMAGE_EXTENSIONS
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=self._handler),
            wds.decode("pil", handler=self._handler),
            wds.to_tuple("__key__", ";".join(keys), handler=self._handler),
        )
        for key, image in pipeline:
            pixels = self.transform(image.convert("RGB"))
            yield (key, pixels) if self.with_keys else pixels
