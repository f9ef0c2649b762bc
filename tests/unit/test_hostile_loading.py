"""Damaged, incomplete or mislabelled SAE files are refused with a ValueError naming the file and the fix.

Every case starts from a valid folder (an embedded SAE copied, a sparsify folder written by sparsify's own
code, saev and RRM files laid out as their projects write them), breaks one thing, and checks the message
names the file, the bad value and what to do. Loading the intact folder first proves the break is the cause.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_rrm
from sae_lens import SAE

from sae_vision_ext.models.embedded import checkpoint_dir
from sae_vision_ext.saes.formats.saelens import saelens_disk_converter
from sae_vision_ext.saes.io import CHECKSUMS_FILE, verify_weights_checksum, write_weights_checksum
from sae_vision_ext.saes.loading import load_sae

FIXTURES = Path(__file__).parents[1] / "fixtures"
EMBEDDED = "shapes-vit/blocks.2.hook_resid_post"


@pytest.fixture
def saelens_folder(tmp_path) -> Path:
    """A copy of a shipped SAE (SAELens format, TopK, d_in 32... as shipped, with checksums.json)."""
    folder = tmp_path / "sae"
    shutil.copytree(checkpoint_dir() / "saes" / EMBEDDED, folder)
    assert load_sae(folder).cfg.d_sae > 0  # intact: loads
    return folder


def edit_cfg(folder: Path, **changes) -> dict:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def test_every_shipped_sae_carries_a_checksum_that_matches():
    folders = sorted((checkpoint_dir() / "saes").glob("*/blocks.*"))
    assert len(folders) == 12
    assert all(verify_weights_checksum(f) for f in folders)


def test_a_missing_k_is_refused_instead_of_sae_lens_default_100(saelens_folder):
    edit_cfg(saelens_folder, k=...)
    with pytest.raises(ValueError, match=r"cfg\.json: architecture 'topk' has no 'k'.*default, 100.*cfg_overrides"):
        load_sae(saelens_folder)
    sae = load_sae(saelens_folder, cfg_overrides={"k": 7})  # the fix the message names
    assert sae.cfg.k == 7


@pytest.mark.parametrize(("k", "why"), [(-3, "-3"), (100000, "100000"), ("eight", "'eight'"), (0, "0"), (True, "True")])
def test_an_invalid_k_names_the_value_and_the_range(saelens_folder, k, why):
    d_sae = edit_cfg(saelens_folder, k=k)["d_sae"]
    with pytest.raises(ValueError, match=rf"k={why} is not valid.*from 1 to d_sae={d_sae}"):
        load_sae(saelens_folder)


@pytest.mark.parametrize("key", ["d_in", "d_sae", "architecture"])
def test_a_config_without_a_required_key_is_refused(saelens_folder, key):
    edit_cfg(saelens_folder, **{key: ...})
    with pytest.raises(ValueError, match=rf"cfg\.json has no '{key}'"):
        load_sae(saelens_folder)


def test_an_unknown_architecture_lists_close_names(saelens_folder):
    edit_cfg(saelens_folder, architecture="banana")
    with pytest.raises(ValueError, match=r"cfg\.json.*'banana'.*topk"):
        load_sae(saelens_folder)
    edit_cfg(saelens_folder, architecture="topkk")
    with pytest.raises(ValueError, match=r"Did you mean.*'topk'"):
        load_sae(saelens_folder)


def test_a_d_in_that_disagrees_with_the_weights_is_refused(saelens_folder):
    cfg = json.loads((saelens_folder / "cfg.json").read_text())
    edit_cfg(saelens_folder, d_in=cfg["d_in"] + 1)
    wrong = rf"d_in={cfg['d_in'] + 1}, d_sae={cfg['d_sae']} but W_enc is \[{cfg['d_in']}, "
    with pytest.raises(ValueError, match=wrong):
        load_sae(saelens_folder)
    edit_cfg(saelens_folder, d_in="32")
    with pytest.raises(ValueError, match=r"d_in='32' is not a positive integer"):
        load_sae(saelens_folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_config_that_is_not_a_json_object_names_the_file(saelens_folder, text):
    (saelens_folder / "cfg.json").write_text(text)
    with pytest.raises(ValueError, match=r"cfg\.json (is not valid JSON \(.* at line 1|holds a JSON list)"):
        load_sae(saelens_folder)


def test_a_truncated_weights_file_fails_its_checksum_with_both_digests(saelens_folder):
    weights = saelens_folder / "sae_weights.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    expected = rf"fails its checksum: expected sha256 [0-9a-f]{{64}} \({size} bytes.*\(truncated\)"
    with pytest.raises(ValueError, match=expected):
        load_sae(saelens_folder)


def test_a_flipped_byte_fails_the_checksum_and_rewriting_it_accepts_the_new_weights(saelens_folder):
    weights = saelens_folder / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"fails its checksum.*write_weights_checksum"):
        load_sae(saelens_folder)
    write_weights_checksum(saelens_folder)  # the fix the message names, for weights replaced on purpose
    assert load_sae(saelens_folder).cfg.d_sae > 0


@pytest.mark.parametrize("cut", [0, 7, 200])
def test_a_truncated_or_empty_weights_file_without_checksum_names_the_file(saelens_folder, cut):
    (saelens_folder / CHECKSUMS_FILE).unlink()
    weights = saelens_folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors is truncated or corrupt"):
        load_sae(saelens_folder)


def test_plain_sae_lens_load_from_disk_gets_the_same_checks(saelens_folder):
    edit_cfg(saelens_folder, k=...)
    with pytest.raises(ValueError, match="has no 'k'"):
        SAE.load_from_disk(saelens_folder, converter=saelens_disk_converter)


def test_a_damaged_checksum_record_is_named(saelens_folder):
    (saelens_folder / CHECKSUMS_FILE).write_text('{"sae_weights.safetensors": "abc"}')
    with pytest.raises(ValueError, match=r"checksums\.json is not a checksum record"):
        load_sae(saelens_folder)


def test_sparsify_without_k_is_refused_not_defaulted_to_32(tmp_path):
    folder = tmp_path / "layers.3"
    shutil.copytree(FIXTURES / "sparsify" / "topk-expansion" / "layers.3", folder)
    assert load_sae(folder).cfg.k == json.loads((folder / "cfg.json").read_text())["k"]
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg\.json has no 'k'"):
        load_sae(folder)
    assert load_sae(folder, cfg_overrides={"k": 3}).cfg.k == 3


def test_saev_topk_without_top_k_is_refused(tmp_path):
    from test_loading import weights, write_saev

    file = write_saev(tmp_path / "s" / "sae.pt", weights(), top_k=8)
    assert load_sae(file).cfg.k == 8
    header = {
        "schema": 2,
        "cfg": {"d_vit": 32, "exp_factor": 3, "activation": {"cls": "TopK", "params": {}}},
        "commit": "abc",
        "lib": "1.0",
    }
    with open(file, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode())
        torch.save(weights(), fd)
    with pytest.raises(ValueError, match=r"sae\.pt: the saev header's TopK activation has no top_k"):
        load_sae(file)
    assert load_sae(file, cfg_overrides={"k": 6}).cfg.k == 6


def test_rrm_loads_the_authors_epoch_50_by_default_and_logs_it(tmp_path, caplog):
    write_rrm(tmp_path, layer=0, epochs=(5, 50, 100))
    write_rrm(tmp_path, layer=1, epochs=(5, 50, 100), seed=1)
    with caplog.at_level(logging.INFO, logger="sae_vision_ext.saes.rrm_checkpoints"):
        saes = load_sae(f"rrm:{tmp_path / 'vit'}")
    assert [s.cfg.metadata.rrm_epoch for s in saes] == [50, 50]
    assert "epoch 50" in caplog.text
    assert [s.cfg.metadata.rrm_epoch for s in load_sae(f"rrm:{tmp_path / 'vit'}", epoch=100)] == [100, 100]
    with pytest.raises(ValueError, match=r"No epoch7\.pth in .*L0; epochs present: 5, 50, 100"):
        load_sae(f"rrm:{tmp_path / 'vit'}", epoch=7)
    with pytest.warns(UserWarning, match=r"loading epoch100\.pth, the largest.*epoch=50"):
        plain = load_sae(tmp_path / "vit" / "K4_R0.5" / "L0")  # a plain folder: the largest, with a warning
    assert plain.cfg.metadata.rrm_epoch == 100


def test_rrm_layers_with_a_gap_are_refused_naming_the_missing_layer(tmp_path):
    for layer in (0, 2, 3):
        write_rrm(tmp_path, layer=layer, epochs=(50,), seed=layer)
    with pytest.raises(ValueError, match=r"layers \[0, 2, 3\] but not for layer\(s\) \[1\] \(missing L1\)"):
        load_sae(f"rrm:{tmp_path / 'vit'}")


def test_epoch_is_refused_for_formats_without_epochs(saelens_folder):
    with pytest.raises(ValueError, match="epoch=3 only applies to RRM checkpoints; this path is in the saelens"):
        load_sae(saelens_folder, epoch=3)
