"""Image sources for harvesting: the embedded shapes set, image folders, any torch ``Dataset``, and
prefixed sources (``hf-dataset:<name or path>[:split]``, ``wds:<shard pattern>``; ``@register_source_prefix``).

Every source yields preprocessed tensors ``[chan, h, w]`` for one model (``model.preprocess``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ShapesImages(Dataset):
    """Images of the procedural shapes set rendered on demand (image ``i`` depends on seed and ``i``)."""

    def __init__(self, n: int, transform: Callable[[Any], Tensor], seed: int = 0, **shape_kwargs: Any) -> None:
        self.n, self.transform, self.seed, self.kwargs = n, transform, seed, shape_kwargs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        from .shapes import render_image

        img, _, _ = render_image(self.seed, i, **self.kwargs)
        return self.transform(torch.from_numpy(img).permute(2, 0, 1))

    def labels(self, n: int | None = None) -> tuple[Tensor, list[str]]:
        """The class of the first ``n`` images (default all) and the class names."""
        from .shapes import SHAPES, render_image

        ids = [render_image(self.seed, i, **self.kwargs)[1] for i in range(self.n if n is None else n)]
        return torch.tensor(ids, dtype=torch.long), list(SHAPES)


class FolderImages(Dataset):
    """Every image file under ``root`` (``ImageFolder`` layout or flat), sorted by path."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Tensor]) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}.")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


SourceFactory = Callable[[Callable[[Any], Tensor], int, int], Dataset]
SOURCES: Registry[SourceFactory] = Registry("image source")
"""Named image sources (``sve:shapes``, ...): ``factory(transform, n_images, seed) -> Dataset``."""


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Decorator registering a named image source, like the model loaders (``@register_loader``). The
    factory must be deterministic in ``(n_images, seed)``: caches fingerprint it by name and seed."""
    return SOURCES.register(name)


PrefixFactory = Callable[[str, Callable[[Any], Tensor], int, int], Dataset]
SOURCE_PREFIXES: Registry[PrefixFactory] = Registry("image source prefix")
"""Prefixed image sources (``hf-dataset``, ``wds``): ``factory(spec, transform, n_images, seed) -> Dataset``
where ``spec`` is the text after ``<prefix>:``."""


def register_source_prefix(prefix: str) -> Callable[[PrefixFactory], PrefixFactory]:
    """Decorator registering a family of sources named ``<prefix>:<spec>`` (e.g. ``wds:/data/{0..9}.tar``)."""
    return SOURCE_PREFIXES.register(prefix)


def split_prefix(source: str) -> tuple[str, str] | None:
    """``(prefix, spec)`` when ``source`` names a registered prefix, else ``None``."""
    prefix, sep, spec = str(source).partition(":")
    return (prefix, spec) if sep and prefix in SOURCE_PREFIXES else None


@register_source_prefix("hf-dataset")
def _hf_dataset(spec: str, transform: Callable[[Any], Tensor], n_images: int, seed: int) -> Dataset:
    from ..distributed import rank_and_world_size
    from .hf_source import open_hf_dataset

    return open_hf_dataset(spec, transform, *rank_and_world_size())


@register_source_prefix("wds")
def _wds(spec: str, transform: Callable[[Any], Tensor], n_images: int, seed: int) -> Dataset:
    from urllib.parse import parse_qs

    from .wds_source import WebDatasetImages

    pattern, _, query = spec.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    if set(options) - {"on_error", "image"}:
        raise ValueError(
            f"wds options {sorted(set(options) - {'on_error', 'image'})} are unknown; valid: on_error, image."
        )
    return WebDatasetImages(pattern, transform, options.get("on_error", "raise"), options.get("image"))  # type: ignore[arg-type]


def source_fingerprint(source: str) -> str | None:
    """A cheap stable id of a prefixed source (names, sizes and mtimes of its files); ``None`` otherwise."""
    import hashlib

    found = split_prefix(source)
    if found is None:
        return None
    prefix, spec = found
    if prefix == "wds":
        from .wds_source import expand_urls

        files = [Path(u.removeprefix("file:")) for u in expand_urls(spec.partition("?")[0])]
    else:
        from .hf_source import parse_spec

        root = Path(parse_spec(spec)[0])
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    h = hashlib.sha256(source.encode())
    for p in files:
        st = p.stat() if p.exists() else None
        h.update(f"{p}:{st.st_size if st else -1}:{int(st.st_mtime) if st else -1}".encode())
    return f"{prefix}:{h.hexdigest()[:16]}"


@register_source("sve:shapes")
def _shapes(transform: Callable[[Any], Tensor], n_images: int, seed: int) -> Dataset:
    return ShapesImages(n_images, transform, seed=seed)


@register_source("sve:shapes-marker")
def _shapes_marker(transform: Callable[[Any], Tensor], n_images: int, seed: int) -> Dataset:
    return ShapesImages(n_images, transform, seed=seed, balanced=True)  # the corner marker on half, any class


def open_image_source(source: str | Dataset, transform: Callable[[Any], Tensor], n_images: int, seed: int) -> Dataset:
    """An image ``Dataset``: a registered name (:data:`SOURCES`: ``"sve:shapes"``, ``"sve:shapes-marker"``,
    the corner marker on half of the images), a prefixed source (:data:`SOURCE_PREFIXES`:
    ``hf-dataset:<name or path>[:split]``, ``wds:<pattern>``), a folder path, a ``datasets.save_to_disk`` folder
    (column ``image``), or a torch ``Dataset`` of images (returned as is)."""
    if isinstance(source, Dataset):
        return source
    if source in SOURCES:
        return SOURCES.get(source)(transform, n_images, seed)
    if (found := split_prefix(source)) is not None:
        return SOURCE_PREFIXES.get(found[0])(found[1], transform, n_images, seed)
    path = Path(source)
    if not path.exists():
        if ":" in str(source):
            SOURCES.get(str(source))  # raises, naming close registered sources
        raise ValueError(
            f"Unknown image source {source!r}: not a registered source ({', '.join(SOURCES.names())}) or prefix "
            f"({', '.join(p + ':' for p in SOURCE_PREFIXES.names())}) and no such "
            "folder. Pass one of those, an image folder, a datasets.save_to_disk folder or a torch Dataset."
        )
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _HFDiskImages(path, transform)
    return FolderImages(path, transform)


class _HFDiskImages(Dataset):
    def __init__(self, path: Path, transform: Callable[[Any], Tensor]) -> None:
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        if "image" not in ds.column_names:
            raise ValueError(f"Dataset at {path} has no 'image' column (columns: {ds.column_names}).")
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.ds[i]["image"].convert("RGB"))


def image_batches(dataset: Dataset, batch_size: int, num_workers: int = 0, epochs: int | None = 1) -> Iterator[Tensor]:
    """Batches of preprocessed images, in order, for ``epochs`` passes (``None``: forever)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    epoch = 0
    while epochs is None or epoch < epochs:
        for batch in loader:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        epoch += 1
