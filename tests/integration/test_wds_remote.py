"""wds: patterns that webdataset's gopen streams (pipe:, network urls): the stream view and `stream: true` read
them; the cache's map-style view refuses them with a ValueError naming the shard and the fixes; file: urls work
in both views (issue 26)."""

from __future__ import annotations

import pytest
import torch
import webdataset as wds
from PIL import Image

from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.data.sources import open_image_source
from sae_vision_ext.data.wds_source import WebDatasetImages
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.train import train_saes


def _shards(tmp_path, n=12, per=4):
    data = make_shapes(n, seed=3)
    with wds.ShardWriter(str(tmp_path / "s-%03d.tar"), maxcount=per, verbose=0) as sink:
        for i, img in enumerate(data.images):
            sink.write({"__key__": f"{i:03d}", "png": Image.fromarray(img), "cls": int(data.labels[i])})
    return f"{tmp_path}/s-{{000..{n // per - 1:03d}}}.tar"


def _mean(im):
    return torch.tensor([float(torch.tensor(list(im.getdata()), dtype=torch.float32).mean())])


def test_pipe_and_file_urls_stream_the_same_images_as_paths(tmp_path):
    local = _shards(tmp_path)
    reference = WebDatasetImages(local, _mean)
    expected = torch.cat([reference[i] for i in range(len(reference))])
    assert len(reference) == 12
    for pattern in (f"file:{local}", f"pipe:cat {local}"):
        stream = WebDatasetImages(pattern, _mean).stream(with_keys=True)
        keys, values = zip(*stream, strict=True)
        assert list(keys) == [f"{i:03d}" for i in range(12)]
        torch.testing.assert_close(torch.cat(values), expected)
    by_file = WebDatasetImages(f"file:{local}", _mean)  # file: urls are local: the map-style view seeks them
    torch.testing.assert_close(torch.cat([by_file[i] for i in range(12)]), expected)


def test_the_map_style_view_refuses_a_streamed_shard_naming_it_and_the_fixes(tmp_path):
    local = _shards(tmp_path)
    for pattern in (f"pipe:cat {local}", "https://example.org/s-{000..002}.tar"):
        ds = open_image_source(f"wds:{pattern}", _mean, 0, 0)  # opening reads nothing
        for use in (len, lambda d: d[0], lambda d: d.fingerprint):
            with pytest.raises(
                ValueError, match=r"wds:.* is read as a stream .*copy the shards to local disk.*stream: true"
            ):
                use(ds)


def test_stream_true_trains_from_a_pipe_pattern(tmp_path):
    local = _shards(tmp_path, n=16)
    hook = "blocks.1.hook_resid_post"
    base = {"model_name": "sve:shapes-vit", "hook_names": [hook], "n_images": 16, "k": 4, "expansion_factor": 1.0,
            "training_tokens": 64 * 4, "train_batch_size": 64, "shuffle_buffer_tokens": 128,
            "token_selection": "patches", "patches_per_image": 8, "image_batch_size": 4, "seed": 1,
            "b_dec_init": "zeros", "checkpoint_every_seconds": None, "stream": True}  # fmt: skip
    out = {}
    for name, pattern in (("pipe", f"pipe:cat {local}"), ("path", local)):
        cfg = VisionSAETrainingConfig(**base, dataset=f"wds:{pattern}", output_dir=str(tmp_path / name))
        out[name] = train_saes(cfg)[hook]
    for key, value in out["path"].state_dict().items():  # the same images in the same order: the same SAE
        torch.testing.assert_close(out["pipe"].state_dict()[key], value)
    with pytest.raises(ValueError, match="is read as a stream"):
        train_saes(VisionSAETrainingConfig(**{**base, "stream": False}, dataset=f"wds:pipe:cat {local}",
                                           cache_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "x")))  # fmt: skip
