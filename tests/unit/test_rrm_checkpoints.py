"""The seed paper's checkpoint layout (rubato-yeong/RRM): files built exactly as the authors'
``2_train_TopKSAE.py`` saves them, checked against the authors' formulas (written out here)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import D_IN, write_rrm

from sae_vision_ext.saes.loading import load_sae
from sae_vision_ext.saes.rrm_checkpoints import rrm_layer_dirs


def rrm_forward(state, k, x):
    """The authors' TopKSAE.forward (``utils/modules/sae.py``): per-token standardisation, relu, top-k."""
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    std = xc.std(-1, keepdim=True)
    xn = xc / (std + 1e-5)
    pre = (xn - state["b_dec"]) @ state["W_enc"]  # b_enc is never added
    acts = torch.relu(pre)
    top = acts.topk(k, dim=-1)
    z = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    return z, (z @ state["W_dec"] + state["b_dec"]) * std + mean


def test_encode_and_decode_equal_the_authors_formulas(tmp_path):
    state = write_rrm(tmp_path, k=4, ratio=0.5, layer=3)
    sae = load_sae(f"rrm:{tmp_path / 'vit' / 'K4_R0.5' / 'L3'}", epoch=100)  # default: the authors' epoch 50
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "timm:vit_base_patch16_224"
    assert sae.cfg.metadata.rrm_epoch == 100
    assert (sae.cfg.d_sae, sae.cfg.k) == (16, 4)
    x = torch.randn(3, 9, D_IN, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    z, recon = rrm_forward(state, 4, x)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts), recon, atol=1e-5, rtol=1e-5)


def test_a_model_folder_loads_the_per_layer_list_ready_for_the_replacement_model(tmp_path):
    paper = {0: (4, 0.25), 1: (16, 0.25), 2: (32, 0.5)}
    states = {
        layer: write_rrm(tmp_path, "dinov2", k, r, layer, (50,), layer, d_in=128) for layer, (k, r) in paper.items()
    }
    write_rrm(tmp_path, "dinov2", 8, 1, 1, epochs=(50,), d_in=128)  # an ablation folder that also holds layer 1
    saes = load_sae(f"rrm:{tmp_path / 'dinov2'}")
    assert [s.cfg.metadata.hook_name for s in saes] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert [s.cfg.d_sae for s in saes] == [32, 32, 64]  # layer 1 from the paper's (16, 0.25), not (8, 1)
    assert {s.cfg.metadata.model_name for s in saes} == {"hf:facebook/dinov2-with-registers-base-imagenet1k-1-layer"}
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    for layer, sae in enumerate(saes):
        torch.testing.assert_close(sae.encode(x), rrm_forward(states[layer], sae.cfg.k, x)[0], atol=1e-5, rtol=1e-5)
    write_rrm(
        tmp_path, "dinov2", 8, 1, 0, epochs=(50,), d_in=128
    )  # layer 0 now also in K8_R1: still the paper's K4_R0.25
    assert rrm_layer_dirs(tmp_path / "dinov2")[0].parent.name == "K4_R0.25"
    write_rrm(tmp_path, "dinov2", 2, 0.5, 5, epochs=(50,), d_in=128)
    write_rrm(tmp_path, "dinov2", 3, 0.5, 5, epochs=(50,), d_in=128)  # layer 5 twice, neither the paper's (96, 2)
    with pytest.raises(ValueError, match=r"Layer 5 .* several K\*_R\* folders \(K2_R0.5, K3_R0.5\)"):
        load_sae(f"rrm:{tmp_path / 'dinov2'}")


def test_converted_sae_saves_and_reloads_in_plain_saelens_in_a_fresh_process(tmp_path):
    state = write_rrm(tmp_path, k=4, ratio=0.5, layer=2)
    sae = load_sae(f"rrm:{tmp_path / 'vit' / 'K4_R0.5' / 'L2' / 'epoch100.pth'}")
    sae.save_model(tmp_path / "saved")
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from sae_lens import SAE; "  # plain SAELens: the package is not imported
        f"sae = SAE.load_from_disk({str(tmp_path / 'saved')!r}); "
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); torch.save(sae.decode(sae.encode(x)), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), rrm_forward(state, 4, x)[1], atol=1e-5, rtol=1e-5)


def test_nonzero_b_enc_is_dropped_with_a_warning_and_bad_files_are_named(tmp_path):
    state = write_rrm(tmp_path, k=4, ratio=0.5, layer=0, epochs=(50,), b_enc_scale=1.0)
    with pytest.warns(UserWarning, match="b_enc is non-zero"):
        sae = load_sae(f"rrm:{tmp_path / 'vit' / 'K4_R0.5' / 'L0'}")
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sae.encode(x), rrm_forward(state, 4, x)[0], atol=1e-5, rtol=1e-5)
    file = tmp_path / "vit" / "K4_R0.5" / "L0" / "epoch50.pth"
    file.write_bytes(file.read_bytes()[:-200])  # truncated
    with pytest.raises(ValueError, match=r"epoch50.pth is corrupt or truncated"):
        load_sae(f"rrm:{file}")
    other = tmp_path / "elsewhere" / "sae.pth"
    other.parent.mkdir()
    torch.save({"model_state_dict": state}, other)
    with pytest.raises(ValueError, match="not in the RRM layout"):
        load_sae(f"rrm:{other}")
    write_rrm(tmp_path, "vit", 20, 0.5, 1, epochs=(50,))  # k 20 > 16 features
    with pytest.raises(ValueError, match=r"k=20 .* 16 features"):
        load_sae(f"rrm:{tmp_path / 'vit' / 'K20_R0.5' / 'L1'}")
