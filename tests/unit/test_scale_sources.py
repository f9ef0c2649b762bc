"""hf-dataset: and wds: image sources, written by their own libraries (datasets, webdataset.ShardWriter)."""

from __future__ import annotations

import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.data.sources import open_image_source
from sae_vision_ext.data.wds_source import WebDatasetImages


def _to_tensor(im):
    return torch.from_numpy(__import__("numpy").array(im.convert("RGB"))).permute(2, 0, 1).float()


def write_shards(folder, n_images, per_shard, seed=0):
    import webdataset as wds

    data = make_shapes(n_images, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, img in enumerate(data.images):
            sink.write({"__key__": f"img{i:05d}", "png": Image.fromarray(img), "cls": int(data.labels[i])})
    return data, sorted(folder.glob("shard-*.tar"))


def write_hf(folder, n_images, seed=0, image_col="image", label_col="label"):
    import datasets

    data = make_shapes(n_images, seed=seed)
    names = [f"c{c}" for c in range(int(data.labels.max()) + 1)]
    ds = datasets.Dataset.from_dict(
        {image_col: [Image.fromarray(im) for im in data.images], label_col: [int(v) for v in data.labels]},
        features=datasets.Features({image_col: datasets.Image(), label_col: datasets.ClassLabel(names=names)}),
    )
    ds.save_to_disk(str(folder))
    return data


def test_wds_map_view_reads_every_image_in_order_with_labels(tmp_path):
    data, shards = write_shards(tmp_path / "w", 10, 4)
    assert len(shards) == 3
    ds = open_image_source(f"wds:{tmp_path}/w/shard-{{000000..000002}}.tar", _to_tensor, 0, 0)
    assert len(ds) == 10 and ds.shard_sizes == [4, 4, 2]
    torch.testing.assert_close(ds[7], torch.from_numpy(data.images[7]).permute(2, 0, 1).float())
    ids, _ = ds.labels()
    assert ids.tolist() == [int(v) for v in data.labels]


def _keys_of(stream, workers):
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [key for key, _ in loader]


def test_wds_stream_two_ranks_two_workers_reads_each_image_exactly_once(tmp_path):
    write_shards(tmp_path / "w", 22, 3)  # 8 shards, the last one short
    ds = WebDatasetImages(f"{tmp_path}/w/shard-{{000000..000007}}.tar", _to_tensor)
    seen = [k for rank in range(2) for k in _keys_of(ds.stream(rank, 2, with_keys=True), 2)]
    assert sorted(seen) == [f"img{i:05d}" for i in range(22)]  # none twice, none lost


def test_wds_stream_resumes_at_a_shard_boundary(tmp_path):
    write_shards(tmp_path / "w", 12, 3)
    ds = WebDatasetImages(f"{tmp_path}/w/shard-{{000000..000003}}.tar", _to_tensor)
    rest = _keys_of(ds.stream(start_shard=2, with_keys=True), 0)
    assert rest == [f"img{i:05d}" for i in range(6, 12)]


def _corrupt_member(shard):
    """Overwrite the bytes of the shard's second image with garbage (the tar stays readable)."""
    with tarfile.open(shard) as tar:
        info = [m for m in tar.getmembers() if m.name.endswith(".png")][1]
    with open(shard, "r+b") as fh:
        fh.seek(info.offset_data)
        fh.write(b"\x00" * info.size)
    return info.name


def test_wds_corrupt_member_raises_naming_it_or_is_skipped_and_counted(tmp_path):
    _, shards = write_shards(tmp_path / "w", 6, 3)
    name = _corrupt_member(shards[0])
    pattern = f"{tmp_path}/w/shard-{{000000..000001}}.tar"
    ds = WebDatasetImages(pattern, _to_tensor)
    with pytest.raises(ValueError, match=name.split(".")[0]):
        ds[1]
    with pytest.raises(ValueError, match="Corrupt webdataset"):
        _keys_of(ds.stream(with_keys=True), 0)
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        skipping = WebDatasetImages(pattern, _to_tensor, on_error="skip")
    with pytest.warns(UserWarning, match="skipped a corrupt"):
        keys = _keys_of(skipping.stream(with_keys=True), 0)
    assert keys == ["img00000", "img00002", "img00003", "img00004", "img00005"]
    assert len(skipping) == 5 and [m.key for m in skipping.members][:2] == ["img00000", "img00002"]
    assert len(skipping.skipped) == 1 and skipping.skipped[0][1] == name


def test_wds_truncated_shard_raises_or_reports(tmp_path):
    _, shards = write_shards(tmp_path / "w", 6, 3)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:700])  # cut inside the first member's data
    pattern = f"{tmp_path}/w/shard-{{000000..000001}}.tar"
    with pytest.raises(ValueError, match="shard-000001"):
        WebDatasetImages(pattern, _to_tensor)
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        ds = WebDatasetImages(pattern, _to_tensor, on_error="skip")
    assert len(ds) == 3 and len(ds.skipped) == 1


def test_hf_dataset_save_to_disk_detects_columns_and_split(tmp_path):
    import datasets

    data = write_hf(tmp_path / "single", 5, image_col="picture", label_col="y")
    ds = open_image_source(f"hf-dataset:{tmp_path}/single", _to_tensor, 0, 0)
    assert (ds.image, ds.label, len(ds)) == ("picture", "y", 5)
    torch.testing.assert_close(ds[3], torch.from_numpy(data.images[3]).permute(2, 0, 1).float())
    ids, names = ds.labels()
    assert ids.tolist() == [int(v) for v in data.labels] and names[0] == "c0"
    d = datasets.load_from_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": d, "test": d.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(open_image_source(f"hf-dataset:{tmp_path}/dict:test", _to_tensor, 0, 0)) == 2
    with pytest.raises(ValueError, match=r"no split 'val'.*'train', 'test'"):
        open_image_source(f"hf-dataset:{tmp_path}/dict:val", _to_tensor, 0, 0)


def test_hf_dataset_missing_column_names_the_columns(tmp_path):
    write_hf(tmp_path / "d", 3)
    with pytest.raises(ValueError, match=r"no image column 'pixels'.*\['image', 'label'\]"):
        open_image_source(f"hf-dataset:{tmp_path}/d?image=pixels", _to_tensor, 0, 0)
    import datasets

    datasets.Dataset.from_dict({"a": [1, 2], "b": ["x", "y"]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(ValueError, match=r"no image column.*\['a', 'b'\]"):
        open_image_source(f"hf-dataset:{tmp_path}/noimg", _to_tensor, 0, 0)


def test_hf_streaming_two_ranks_two_workers_reads_each_image_exactly_once(tmp_path):
    from sae_vision_ext.data.hf_source import open_hf_dataset

    data = write_hf(tmp_path / "d", 10)
    flat = [_to_tensor(Image.fromarray(im)).sum().item() for im in data.images]
    seen = []
    for rank in range(2):
        stream = open_hf_dataset(f"{tmp_path}/d?streaming=1", _to_tensor, rank, 2)
        seen += [x.sum().item() for x in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(seen) == sorted(flat)
    with pytest.raises(ValueError, match=r"no length.*stream: true"):
        len(stream)
