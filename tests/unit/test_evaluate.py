"""evaluate_sae: exact metrics for an exactly-invertible SAE, and independent recomputation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import HOOK, build_native, identity_sae, images
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_vision_ext import HookedViT
from sae_vision_ext.cli import main
from sae_vision_ext.saes.evaluate import evaluate_sae


def random_sae(d: int) -> StandardSAE:
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=3 * d, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.b_enc.add_(-0.2)
    return sae


def test_perfect_sae_scores_perfectly_on_a_classifier():
    model = HookedViT.from_model(build_native("timm_cls"))
    x, labels = images(8), torch.arange(8) % 5
    m = evaluate_sae(model, identity_sae(32), x, labels)
    assert m["fvu"] < 1e-10 and m["kl_spliced"] < 1e-8 and m["top1_agreement_spliced"] == 1.0
    assert abs(m["loss_recovered"] - 1.0) < 1e-5
    assert m["accuracy"]["spliced"] == m["accuracy"]["clean"]
    assert m["kl_ablated"] > 1e-3, "mean ablation must hurt, or loss_recovered means nothing"


def test_random_sae_metrics_match_independent_computation():
    model = HookedViT.from_model(build_native("timm_registers"))  # 4 prefix tokens
    sae, x = random_sae(32), images(6)
    m = evaluate_sae(model, sae, x, batch_size=4)
    with torch.no_grad():
        clean, cache = model.run_with_cache(x, names_filter=HOOK)
        a = cache[HOOK]
        f = sae.encode(a)
        r = sae.decode(f)
        flat = a.flatten(0, 1)
        fvu = ((flat - r.flatten(0, 1)) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
        spliced = model.run_with_saes(x, saes=[sae])
    assert abs(m["fvu"] - float(fvu)) < 1e-5 and abs(m["explained_variance"] - (1 - float(fvu))) < 1e-5
    assert abs(m["l0"] - float((f != 0).sum(-1).float().mean())) < 1e-5
    assert abs(m["l0_prefix"] - float((f[:, :4] != 0).sum(-1).float().mean())) < 1e-5
    assert abs(m["l0_patches"] - float((f[:, 4:] != 0).sum(-1).float().mean())) < 1e-5
    kl = F.kl_div(F.log_softmax(spliced, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean")
    assert abs(m["kl_spliced"] - float(kl)) < 1e-5
    assert m["n_tokens"] == 6 * 20 and 0.0 <= m["dead_fraction"] <= 1.0


def test_embedding_model_uses_cosine():
    model = HookedViT.from_model(build_native("open_clip_tok"))
    m = evaluate_sae(model, identity_sae(32), images(4))
    assert abs(m["cosine"]["spliced"] - 1.0) < 1e-6 and m["cosine"]["ablated"] < 0.999
    assert abs(m["loss_recovered"] - 1.0) < 1e-5 and "kl_spliced" not in m


def test_cli_eval_writes_table_and_json(tmp_path, capsys):
    identity_sae(128).save_model(tmp_path / "sae")
    args = ["eval", "--model", "sve:shapes-vit", "--saes", str(tmp_path / "sae"), "--n-images", "32"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| explained_variance | 1.0000 |" in out and "l0_cls" not in out
    with pytest.warns(DeprecationWarning, match="--saes"):  # the old flag still works for one release
        assert main(["eval", "--model", "sve:shapes-vit", "--sae", str(tmp_path / "sae"), "--n-images", "8"]) == 0
    with pytest.raises(SystemExit, match="needs --saes"):
        main(["eval", "--model", "sve:shapes-vit"])
    saved = json.loads((tmp_path / "eval" / f"{HOOK}.json").read_text())
    assert saved["accuracy"]["spliced"] == saved["accuracy"]["clean"] > 0.7


def test_layer_norm_sae_is_evaluated_with_each_chunks_own_statistics():
    """SAELens keeps a layer_norm SAE's per-token statistics from the last ``encode`` for the next
    ``decode``; evaluate_sae must decode each chunk right after encoding it (it crashed before)."""
    from helpers import make_sae

    model = HookedViT.from_model(build_native("timm_cls")).double()
    sae = make_sae("topk", "layer_norm", True, d_in=32, hook=HOOK)
    pixels = images(6).double()
    metrics = evaluate_sae(model, sae, pixels, batch_size=4)  # two chunks of different sizes
    _, cache = model.run_with_cache(pixels, names_filter=HOOK)
    x = cache[HOOK]
    recon = sae.decode(sae.encode(x))
    flat_x, flat_r = x.flatten(0, -2), recon.flatten(0, -2)
    fvu = float((flat_x - flat_r).pow(2).sum() / (flat_x - flat_x.mean(0)).pow(2).sum())
    assert abs(metrics["fvu"] - fvu) < 1e-10
