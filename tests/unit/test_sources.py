"""Image sources for harvesting: folders, datasets.save_to_disk folders, and the package namespace."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sae_vision_ext as sve
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.data.sources import open_image_source


@pytest.fixture(scope="module")
def model():
    return sve.HookedViT.from_pretrained("sve:shapes-vit")


def test_image_folder_nested_and_flat(tmp_path, model):
    data = make_shapes(4, seed=3)
    for i, img in enumerate(data.images):
        sub = tmp_path / ("a" if i < 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i}.png")
    ds = open_image_source(str(tmp_path), model.preprocess, n_images=10, seed=0)
    assert len(ds) == 4
    expected = model.preprocess(torch.from_numpy(data.images[2]).permute(2, 0, 1))
    torch.testing.assert_close(ds[2], expected)


def test_datasets_save_to_disk_folder(tmp_path, model):
    import datasets  # installed with sae-lens

    data = make_shapes(3, seed=4)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in data.images], "label": [0, 1, 2]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    src = open_image_source(str(tmp_path / "hf"), model.preprocess, n_images=3, seed=0)
    torch.testing.assert_close(src[1], model.preprocess(torch.from_numpy(np.asarray(data.images[1])).permute(2, 0, 1)))


def test_unknown_source_and_empty_folder(tmp_path, model):
    with pytest.raises(ValueError, match="Unknown image source 'sve:shape'"):
        open_image_source("sve:shape", model.preprocess, 1, 0)
    with pytest.raises(ValueError, match="No images"):
        open_image_source(str(tmp_path), model.preprocess, 1, 0)


def test_namespace_exports_and_cheap_import():
    for name in ("HookedViT", "VisionSAETrainingConfig", "train_saes", "load_sae", "evaluate_sae", "make_shapes",
                 "list_adapters", "TrainingInterrupted"):  # fmt: skip
        assert getattr(sve, name) is not None
    code = "import sys, sae_vision_ext; assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing the package loads nothing heavy"
