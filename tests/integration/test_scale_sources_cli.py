"""`sae-vision cache` and `train` on two gloo processes from a webdataset and a Hugging Face dataset
written by their own libraries: the cache equals a one-process cache of a folder of the same images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sae_vision_ext.cli import main
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
N = 16


def _config(tmp, name, dataset, extra=None) -> str:
    cfg = {"model_name": "sve:shapes-vit", "dataset": dataset, "n_images": N, "images_per_shard": 4,
           "hook_names": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "cache_dir": str(tmp / f"c-{name}"),
           "output_dir": str(tmp / f"o-{name}"), "k": 8, "expansion_factor": 2.0, "training_tokens": 1024,
           "train_batch_size": 128, "shuffle_buffer_tokens": 512, "token_selection": "patches",
           "patches_per_image": 16, "seed": 1, **(extra or {})}  # fmt: skip
    path = tmp / f"cfg-{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _shards(cache):
    (folder,) = cache.iterdir()
    return {p.name: load_file(p) for p in sorted(folder.glob("shard_*.safetensors"))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import datasets
    import webdataset as wds

    tmp = tmp_path_factory.mktemp("sources")
    data = make_shapes(N, seed=5)
    (tmp / "folder").mkdir()
    (tmp / "wds").mkdir()
    with wds.ShardWriter(str(tmp / "wds" / "s-%04d.tar"), maxcount=3, verbose=0) as sink:
        for i, img in enumerate(data.images):
            Image.fromarray(img).save(tmp / "folder" / f"{i:03d}.png")
            sink.write({"__key__": f"{i:03d}", "png": Image.fromarray(img), "cls": int(data.labels[i])})
    hf = datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in data.images]})
    hf.cast_column("image", datasets.Image()).save_to_disk(str(tmp / "hf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["cache", "--config", _config(tmp, "folder", str(tmp / "folder"))]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp


@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_two_process_cache_and_train_from_wds_and_hf(sources, tmp_path, kind):
    dataset = f"wds:{sources}/wds/s-{{0000..0005}}.tar" if kind == "wds" else f"hf-dataset:{sources}/hf"
    cfg = _config(tmp_path, kind, dataset)
    assert launch_local(["cache", "--config", cfg], 2, 1, 180) == [0, 0]
    got, ref = _shards(tmp_path / f"c-{kind}"), _shards(sources / "c-folder")
    assert list(got) == list(ref) and len(got) == N // 4
    for name in got:  # every image harvested once, in order, by the rank owning its cache shard
        for hook in got[name]:
            assert torch.equal(got[name][hook], ref[name][hook]), (name, hook)
    assert launch_local(["train", "--config", cfg], 2, 1, 180) == [0, 0]
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert (tmp_path / f"o-{kind}" / hook / "sae_weights.safetensors").exists()
