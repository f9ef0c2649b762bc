"""``stream: true``: harvest straight into training, no activation cache on disk.

The model runs once per image batch for all hooks (stopped after the deepest); the tokens go through
one :class:`~sae_vision_ext.activations.harvest.ShuffleBuffer` shared by the hooks and every hook's SAE
trains on the same batches (SAELens's ``MultiSAETrainer``). Memory is bounded by the buffer:
``shuffle_buffer_tokens × d_model × 4 bytes × hooks`` (float32), plus one image batch's activations.

With ``data_parallel: true`` under torchrun each rank harvests its own images (:func:`rank_images`:
every ``world``-th image of a map-style source; its own shards of a ``wds:`` source, split again
across ``DataLoader`` workers; a streaming ``hf-dataset:`` is split by ``datasets``), fills its own
buffer and draws ``train_batch_size / world`` tokens per step: the model's work is divided by the
number of ranks and nothing is written to disk. Gradients and bookkeeping are synchronised as in
``ddp.py``; the global batch mixes the ranks' images, so the run is not token-for-token a one-process
run (the cached data-parallel mode is).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

if TYPE_CHECKING:
    from ..models.hooked_vit import HookedViT
    from .config import VisionSAETrainingConfig


def rank_images(dataset: Dataset, rank: int, world: int) -> Dataset:
    """The images ``rank`` of ``world`` harvests: disjoint over ranks, together all of them."""
    from ..data.wds_source import WebDatasetImages

    if isinstance(dataset, WebDatasetImages):
        return dataset.stream(rank, world)
    if isinstance(dataset, IterableDataset) or world == 1:
        return dataset  # streaming hf-dataset: already split by node when opened
    return Subset(dataset, range(rank, len(dataset), world))


def streamed_batches(
    cfg: VisionSAETrainingConfig,
    model: HookedViT,
    dataset: Dataset,
    hooks: list[str],
    *,
    rank: int,
    world: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled ``{hook: [train_batch_size / world, d_in]}`` from this rank's images."""
    from ..activations.harvest import ShuffleBuffer, harvest
    from ..data.sources import image_batches

    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    images = rank_images(dataset, rank, world)
    workers = max(1, cfg.num_workers)
    if hasattr(images, "my_shards") and not any(images.my_shards(w, workers) for w in range(workers)):
        raise ValueError(
            f"rank {rank} of {world} has no webdataset shard to stream ({len(images.urls)} shards): use at most "
            "as many processes as shards, or write more shards."
        )
    batches = image_batches(images, cfg.image_batch_size, cfg.num_workers, epochs=None)
    stream = harvest(
        model,
        (b.to(cfg.device) for b in batches),
        hooks,
        cfg.token_selection,
        cfg.patches_per_image,
        generator=gen,
    )
    return ShuffleBuffer(cfg.shuffle_buffer_tokens, cfg.train_batch_size // world, gen)(stream)
