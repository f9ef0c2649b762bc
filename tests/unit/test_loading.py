"""Loading mechanics around the formats: pickling opt-in, Hub releases, training folders, splicing.

Exactness against each project's own code is in ``test_foreign_fixtures.py`` (files written by the
owners' code); the small files written here only exercise the loading paths."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import build_native, images

from sae_vision_ext import HookedViT
from sae_vision_ext.saes import loading
from sae_vision_ext.saes.loading import RELEASES, load_sae

D_IN, D_SAE = 32, 96


def weights(seed: int = 0, enc_bias: float = 0.0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        W_enc=torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        b_enc=torch.randn(D_SAE, generator=g) * 0.1 + enc_bias,
        W_dec=torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5,
        b_dec=torch.randn(D_IN, generator=g) * 0.1,
    )


def write_prisma(folder: Path, w, k: int | None, layer_norm: bool, file: str = "n_images_2600058.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "d_in": D_IN,
        "expansion_factor": D_SAE // D_IN,
        "hook_point_layer": 1,
        "layer_subtype": "hook_resid_post",
        "activation_fn_str": "topk" if k else "relu",
        "activation_fn_kwargs": {"k": k} if k else {},
        "normalize_activations": "layer_norm" if layer_norm else None,
        "cls_token_only": True,
        "use_patches_only": False,
        "model_name": "open-clip:laion/CLIP-ViT-B-32",
        "context_size": 50,
        "architecture": "standard",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(w, folder / file)
    return folder


def write_saev(file: Path, w, activation: str = "TopK", top_k: int = 8, schema: int | None = 2) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"d_vit": D_IN, "exp_factor": D_SAE // D_IN, "n_reinit_samples": 10, "seed": 0}
    if schema is None:
        header = cfg
    else:
        params = {"top_k": top_k} if activation != "Relu" else {}
        header = {
            "schema": schema,
            "cfg": {**cfg, "activation": {"cls": activation, "params": params}},
            "commit": "abc",
            "lib": "1.0",
        }
    with open(file, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode())
        torch.save(w, fd)
    return file


def test_signed_topk_saves_and_reloads_in_saelens_format(tmp_path):
    sae = load_sae(write_saev(tmp_path / "s" / "sae.pt", weights(enc_bias=-2.0)))
    sae.save_model(tmp_path / "converted")
    again = load_sae(tmp_path / "converted")
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    assert json.loads((tmp_path / "converted" / "cfg.json").read_text())["architecture"] == "signed_topk"
    # a fresh process: load_sae registers signed_topk with SAELens before reading the folder
    import subprocess
    import sys

    torch.save(x, tmp_path / "x.pt")
    code = (
        f"import sys, torch, sae_vision_ext as sve; sae = sve.load_sae({str(tmp_path / 'converted')!r}); "
        f"torch.save(sae.encode(torch.load({str(tmp_path / 'x.pt')!r})), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), sae.encode(x))


def test_pickled_objects_need_explicit_opt_in(tmp_path):
    folder = tmp_path / "pickled"
    write_prisma(folder, weights(), 8, True)
    torch.save({"cfg": argparse.Namespace(d_in=D_IN), "state_dict": weights()}, folder / "n_images_2600058.pt")
    with pytest.raises(ValueError, match=r"weights_only=True.*allow_pickle=True"):
        load_sae(folder)
    assert load_sae(folder, allow_pickle=True).cfg.d_sae == D_SAE


def test_prisma_sae_splices_into_a_model(tmp_path):
    model = HookedViT.from_model(build_native("open_clip_tok"), model_name="open-clip:laion/CLIP-ViT-B-32")
    sae = load_sae(write_prisma(tmp_path / "p", weights(), 8, True))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            model.run_with_saes(x, saes=[sae], use_error_term=True), model(x), atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(model.run_with_saes(x, saes=[sae]), model(x))


def test_release_registry_fetches_through_the_hub_converter(tmp_path, monkeypatch):
    folder = write_prisma(tmp_path / "hub", weights(), 8, True)
    asked = []
    monkeypatch.setattr(loading, "_download", lambda repo, filename, force=False: asked.append(repo) or folder)
    name = "prisma-clip-b32-topk64-cls-layer9-resid_post"
    sae = load_sae(name)
    assert asked == ["Prisma-Multimodal/sae-top_k-64-cls_only-layer_9-hook_resid_post"]
    assert sae.cfg.metadata.hook_name == "blocks.9.hook_resid_post"
    # from the checkpoint's config, mapped to this package's loader id (the original kept beside it)
    assert sae.cfg.metadata.model_name == "open_clip:hf-hub:laion/CLIP-ViT-B-32"
    assert sae.cfg.metadata.prisma_model_name == "open-clip:laion/CLIP-ViT-B-32"
    assert {"saev-clip-b16-in1k", "saev-dinov2-b14-in1k"} <= set(RELEASES.names())


def test_offline_hub_error_and_unknown_references(tmp_path):
    with pytest.raises(ValueError, match=r"Could not fetch .* Are you offline"):
        load_sae("saev:osunlp/SAE_CLIP_24K_ViT-B-16_IN1K")
    with pytest.raises(ValueError, match="is not a path, a known release"):
        load_sae("no/such/thing")
    with pytest.raises(ValueError, match=r"No embedded SAE 'sve:shapes-vit/blocks\.99\.hook_resid_post'"):
        load_sae("sve:shapes-vit/blocks.99.hook_resid_post")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="Cannot tell the SAE format"):
        load_sae(tmp_path / "junk")


def test_prisma_training_folder_takes_the_largest_checkpoint_and_skips_sparsity_files(tmp_path):
    """VisionSAETrainer.checkpoint() writes several n_images_<N>.pt beside their
    n_images_<N>_log_feature_sparsity.pt; the newest is the largest N numerically."""
    folder = tmp_path / "prisma"
    old, new = weights(), weights()
    with torch.no_grad():
        new["W_enc"] += 1.0
    write_prisma(folder, old, 8, True, file="n_images_999.pt")
    write_prisma(folder, new, 8, True, file="n_images_1300000.pt")
    for n in (999, 1300000):
        torch.save(torch.randn(D_SAE), folder / f"n_images_{n}_log_feature_sparsity.pt")
    sae = load_sae(folder)
    torch.testing.assert_close(sae.W_enc, new["W_enc"].float())
    assert sae.W_enc.is_contiguous() and sae.W_dec.is_contiguous()


def test_hub_releases_pass_allow_pickle_and_the_seed_releases_load_the_layer_list(tmp_path, monkeypatch):
    from helpers import write_rrm

    folder = write_prisma(tmp_path / "hub", weights(), 8, True)
    w = torch.load(folder / "n_images_2600058.pt")
    torch.save({"state_dict": w, "cfg": argparse.Namespace(d_in=D_IN)}, folder / "n_images_2600058.pt")  # pickled
    monkeypatch.setattr(loading, "_download", lambda repo, filename, force=False: folder)
    name = "prisma-clip-b32-topk64-cls-layer9-resid_post"
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_sae(name)
    assert load_sae(name, allow_pickle=True).cfg.d_sae == D_SAE  # the opt-in reaches the Hub converter
    for layer in (0, 1):
        write_rrm(tmp_path / "rrm_hub", "vit", 4, 0.5, layer, epochs=(50,))
    monkeypatch.setattr(loading, "_download", lambda repo, filename, force=False: tmp_path / "rrm_hub")
    saes = load_sae("rrm-vit")
    assert [s.cfg.metadata.hook_name for s in saes] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert saes[0].cfg.metadata.model_name == "timm:vit_base_patch16_224"
