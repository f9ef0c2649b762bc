"""``hf-dataset:<name or local path>[:split][?image=col&label=col&streaming=1]``: a Hugging Face dataset.

A local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
``datasets.load_from_disk``; anything else with ``datasets.load_dataset(name, split=split)`` (a hub
name when online, a local data folder, a script). The image column is ``image=`` or detected (the
first ``datasets.Image`` feature, else a column named ``image``/``img``/``jpg``/``png``); the label
column is ``label=`` or the first ``ClassLabel`` feature (else ``label``/``labels``), optional. A
named column that does not exist raises ``ValueError`` naming the columns present.

Non-streaming datasets are map-style (:class:`HFImages`: the cache splits them across ranks by cache
shard, a ``DataLoader`` across workers). ``streaming=1`` gives :class:`HFImageStream`, an
``IterableDataset`` split across ranks with ``datasets.distributed.split_dataset_by_node`` and across
``DataLoader`` workers by ``datasets`` itself (by shard when there are enough, else by example): every
example is read once over all ranks and workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

IMAGE_NAMES = ("image", "img", "jpg", "png", "pixel_values")
LABEL_NAMES = ("label", "labels", "cls", "fine_label")


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``name[:split][?options]`` -> ``(name, split, options)``; an existing path keeps its colons."""
    spec, _, query = spec.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - {"image", "label", "streaming"}
    if unknown:
        raise ValueError(f"hf-dataset options {sorted(unknown)} are unknown; valid: image, label, streaming.")
    name, split = spec, None
    if ":" in spec and not Path(spec).exists():
        name, split = spec.rsplit(":", 1)
    if not name:
        raise ValueError("hf-dataset: needs a dataset name or a local path (hf-dataset:<name or path>[:split]).")
    return name, split or None, options


def _columns(features: Any, column_names: list[str], image: str | None, label: str | None) -> tuple[str, str | None]:
    import datasets

    for chosen, what in ((image, "image"), (label, "label")):
        if chosen is not None and chosen not in column_names:
            raise ValueError(f"hf-dataset has no {what} column {chosen!r}; its columns: {column_names}.")
    if image is None:
        typed = [c for c in column_names if features is not None and isinstance(features.get(c), datasets.Image)]
        named = [c for c in IMAGE_NAMES if c in column_names]
        if not typed and not named:
            raise ValueError(
                f"hf-dataset has no image column (no datasets.Image feature, none named {list(IMAGE_NAMES)}); its "
                f"columns: {column_names}. Name it with ?image=<column>."
            )
        image = (typed or named)[0]
    if label is None:
        typed = [c for c in column_names if features is not None and isinstance(features.get(c), datasets.ClassLabel)]
        named = [c for c in LABEL_NAMES if c in column_names]
        label = (typed or named or [None])[0]
    return image, label


def load(name: str, split: str | None, streaming: bool) -> Any:
    """The ``datasets`` object for ``name``/``split`` (first split of a ``DatasetDict`` when none given)."""
    import datasets

    path = Path(name)
    if path.exists() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                raise ValueError(f"hf-dataset:{name} has no split {split!r}; its splits: {list(ds)}.")
            ds = ds[split or next(iter(ds))]
        elif split is not None:
            raise ValueError(f"hf-dataset:{name} is a single Dataset (no splits); drop ':{split}'.")
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) if streaming else ds
    ds = datasets.load_dataset(name, split=split, streaming=streaming)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = ds[next(iter(ds))]
    return ds


def _to_pil(value: Any) -> Any:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io

        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"]).convert("RGB")
    raise ValueError(f"hf-dataset image value of type {type(value).__name__} is not an image.")


class HFImages(Dataset):
    """A map-style Hugging Face dataset's images (``image`` column), labels from its label column."""

    def __init__(self, ds: Any, transform: Callable[[Any], Tensor], image: str, label: str | None, spec: str) -> None:
        self.ds, self.transform, self.image, self.label, self.spec = ds, transform, image, label, spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(_to_pil(self.ds[int(i)][self.image]))

    def labels(self, n: int | None = None) -> tuple[Tensor, list[str]]:
        """Class ids of the first ``n`` images and the class names (the ``ClassLabel``'s, else ``"0".."max"``)."""
        if self.label is None:
            raise ValueError(f"hf-dataset:{self.spec} has no label column; name one with ?label=<column>.")
        col = self.ds.select(range(len(self) if n is None else min(n, len(self))))[self.label]
        ids = torch.tensor(list(col), dtype=torch.long)
        feature = self.ds.features.get(self.label)
        names = list(getattr(feature, "names", None) or [str(c) for c in range(int(ids.max()) + 1)])
        return ids, names

    @property
    def fingerprint(self) -> str:
        return f"hf-dataset:{self.spec}:{getattr(self.ds, '_fingerprint', '')}"


class HFImageStream(IterableDataset):
    """A streaming (``IterableDataset``) Hugging Face dataset for one rank; workers split by ``datasets``."""

    def __init__(
        self, ds: Any, transform: Callable[[Any], Tensor], image: str, rank: int = 0, world_size: int = 1
    ) -> None:
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds
        self.transform, self.image = transform, image

    def __len__(self) -> int:
        raise ValueError(
            "A streaming hf-dataset (streaming=1) has no length: the activation cache needs a map-style source. "
            "Drop streaming=1, or train with stream: true and cache_dir: null."
        )

    def __iter__(self) -> Iterator[Tensor]:
        for row in self.ds:
            yield self.transform(_to_pil(row[self.image]))


def open_hf_dataset(
    spec: str, transform: Callable[[Any], Tensor], rank: int = 0, world_size: int = 1
) -> HFImages | HFImageStream:
    """The ``hf-dataset:`` source ``spec`` (the part after the prefix; module docstring)."""
    name, split, options = parse_spec(spec)
    streaming = options.get("streaming", "0").lower() in ("1", "true", "yes")
    ds = load(name, split, streaming)
    columns = list(ds.column_names or (ds.features or {}).keys())
    image, label = _columns(ds.features, columns, options.get("image"), options.get("label"))
    if streaming:
        return HFImageStream(ds, transform, image, rank, world_size)
    return HFImages(ds, transform, image, label, spec)
