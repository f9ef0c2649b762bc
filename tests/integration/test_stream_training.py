"""stream: true: harvest straight into training (one forward for every hook, no cache on disk), and
its data-parallel form where each rank harvests its own images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sae_vision_ext as sve
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.data.wds_source import WebDatasetImages
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.stream import rank_images
from sae_vision_ext.training.train import train_saes

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
BASE = {"model_name": "sve:shapes-vit", "dataset": "sve:shapes", "n_images": 32, "hook_names": HOOKS, "k": 8,
        "expansion_factor": 2.0, "training_tokens": 128 * 8, "train_batch_size": 128, "shuffle_buffer_tokens": 512,
        "token_selection": "patches", "patches_per_image": 16, "image_batch_size": 8, "seed": 4,
        "b_dec_init": "zeros", "checkpoint_every_seconds": None}  # fmt: skip


def test_stream_refuses_a_cache_dir():
    with pytest.raises(ValueError, match=r"stream=True.*cache_dir='c'"):
        VisionSAETrainingConfig(**BASE, stream=True, cache_dir="c")


def test_stream_runs_the_model_once_for_every_hook_and_writes_no_cache(tmp_path):
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    images = []
    model.register_forward_hook(lambda _m, args, _out: images.append(args[0].shape[0]))
    cfg = VisionSAETrainingConfig(**BASE, stream=True, output_dir=str(tmp_path / "out"))
    saes = train_saes(cfg, model)
    assert set(saes) == set(HOOKS)
    # tokens drawn: 8 steps x 128 (+ the buffer's fill) at 16 per image: a shared forward reads
    # (1024 + 512) / 16 = 96 images plus one batch; a forward per hook would read twice that
    assert 96 <= sum(images) <= 96 + 2 * 8
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*HOOKS, "training_config.json"])


def test_rank_images_are_disjoint_and_complete(tmp_path):
    import webdataset as wds

    data = make_shapes(10, seed=1)
    with wds.ShardWriter(str(tmp_path / "s-%03d.tar"), maxcount=2, verbose=0) as sink:
        for i, img in enumerate(data.images):
            sink.write({"__key__": f"{i:03d}", "png": Image.fromarray(img)})
    ds = WebDatasetImages(f"{tmp_path}/s-{{000..004}}.tar", lambda im: torch.zeros(1))
    views = [rank_images(ds, r, 2) for r in range(2)]
    for v in views:
        v.with_keys = True
    seen = [key for v in views for key, _ in v]
    assert sorted(seen) == [f"{i:03d}" for i in range(10)]
    shapes = sve.data.sources.ShapesImages(7, lambda x: x)
    parts = [list(rank_images(shapes, r, 3).indices) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_stream_from_webdataset_on_two_ranks(tmp_path):
    import webdataset as wds

    from sae_vision_ext.launch import launch_local

    data = make_shapes(32, seed=2)
    with wds.ShardWriter(str(tmp_path / "s-%03d.tar"), maxcount=8, verbose=0) as sink:
        for i, img in enumerate(data.images):
            sink.write({"__key__": f"{i:03d}", "png": Image.fromarray(img)})
    cfg = {**BASE, "dataset": f"wds:{tmp_path}/s-{{000..003}}.tar", "stream": True, "data_parallel": True,
           "output_dir": str(tmp_path / "out")}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert launch_local(["train", "--config", str(tmp_path / "cfg.json")], 2, 1, 240) == [0, 0]
    for hook in HOOKS:
        assert (tmp_path / "out" / hook / "sae_weights.safetensors").exists()
