"""The shipped transcoders of both embedded models (examples/build_embedded_transcoders.py): loadable offline by id,
the classes and hooks the replacement model needs, and replacing the MLPs as well as summary.json says."""

from __future__ import annotations

import json

import pytest
import torch

from sae_vision_ext.models.embedded import checkpoint_dir
from sae_vision_ext.saes.loading import load_sae

MODELS = ["shapes-vit", "shapes-vit-biased"]
"""Every embedded model ships one TopK transcoder per block and one CLT."""


@pytest.mark.parametrize("name", MODELS)
def test_transcoders_load_by_id_one_per_block_in_order(name):
    from sae_vision_ext.saes.transcoders import TopKTranscoder

    transcoders = load_sae(f"sve:{name}/transcoders")
    assert [type(t) for t in transcoders] == [TopKTranscoder] * 6
    assert [t.cfg.metadata.hook_name for t in transcoders] == [f"blocks.{i}.ln2.hook_normalized" for i in range(6)]
    assert [t.cfg.metadata.hook_name_out for t in transcoders] == [f"blocks.{i}.hook_mlp_out" for i in range(6)]
    assert all(t.W_enc.dtype == torch.float32 and t.cfg.k == 16 for t in transcoders)
    one = load_sae(f"sve:{name}/transcoders/blocks.3.ln2.hook_normalized")
    torch.testing.assert_close(one.W_dec, transcoders[3].W_dec, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_clt_loads_by_id_and_in_circuit_tracer(name):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt

    from sae_vision_ext.saes.clt import CrossLayerTranscoder

    clt = load_sae(f"sve:{name}/clt")
    assert isinstance(clt, CrossLayerTranscoder) and clt.W_enc.dtype == torch.float32
    assert (clt.cfg.n_layers, clt.cfg.activation, clt.cfg.k, clt.cfg.hook_in) == (6, "topk", 16, "ln2.hook_normalized")
    folder = str(checkpoint_dir() / "saes" / name / "clt")
    theirs = ct_load_clt(folder, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    torch.testing.assert_close(theirs.W_dec[2], clt.W_dec[2], atol=0, rtol=0)
    torch.testing.assert_close(theirs.b_enc, clt.b_enc, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_shipped_figures_hold_on_fresh_images(name, kind):
    from sae_vision_ext import HookedViT
    from sae_vision_ext.data.shapes import make_shapes
    from sae_vision_ext.saes.evaluate_transcoders import evaluate_transcoders

    summary = json.loads((checkpoint_dir() / "saes" / name / kind / "summary.json").read_text())
    model = HookedViT.from_pretrained(f"sve:{name}")
    x, y = make_shapes(96, seed=7, balanced=True).tensors()
    m = evaluate_transcoders(model, load_sae(f"sve:{name}/{kind}"), model.preprocess(x), y)
    assert m["fvu"] == pytest.approx(summary["fvu"], abs=0.05)  # float16 weights, other images
    assert m["loss_recovered"] > 0.5 and summary["loss_recovered"] > 0.5
    assert m["accuracy"]["replaced"] > m["accuracy"]["ablated"]


def test_sae_vision_eval_reports_the_replaced_model(capsys):
    from sae_vision_ext.cli import main

    assert main(["eval", "--model", "sve:shapes-vit", "--saes", "sve:shapes-vit/clt", "--n-images", "16"]) == 0
    out = capsys.readouterr().out
    assert "## sve:shapes-vit/clt" in out and "| fvu blocks.5.hook_mlp_out |" in out
    assert "| loss_recovered |" in out and "| kl_replaced |" in out
