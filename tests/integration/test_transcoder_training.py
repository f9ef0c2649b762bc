"""Training transcoders and cross-layer transcoders (architecture transcoder / skip_transcoder / clt):
saved in SAELens's transcoder format (plain SAELens loads it) and circuit-tracer's CLT layout (its own
load_clt reads it with equal outputs), evaluated as MLP replacements, resumable after a SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.training.config import VisionSAETrainingConfig
from sae_vision_ext.training.train import train_saes


def _cfg(out, **kw) -> VisionSAETrainingConfig:
    base = dict(model_name="sve:shapes-vit", architecture="transcoder", layers=[0, 1], n_images=200,
                training_tokens=512 * 12, train_batch_size=512, shuffle_buffer_tokens=4096, image_batch_size=50,
                expansion_factor=2, k=8, lr=1e-3, seed=1, output_dir=str(out),
                checkpoint_every_seconds=None)  # fmt: skip
    return VisionSAETrainingConfig(**(base | kw))


@pytest.fixture(scope="module")
def model():
    from sae_vision_ext import HookedViT

    return HookedViT.from_pretrained("sve:shapes-vit")


@pytest.fixture(scope="module")
def held_out(model):
    x, y = make_shapes(48, seed=4242).tensors()
    return model.preprocess(x), y


@pytest.mark.slow
def test_topk_transcoders_train_save_as_saelens_and_replace_the_mlps(tmp_path, model, held_out):
    from sae_vision_ext.saes.evaluate_transcoders import evaluate_transcoders

    cfg = _cfg(tmp_path / "run", training_tokens=512 * 40)
    out = train_saes(cfg, model=model)
    assert list(out) == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    script = (  # plain SAELens in a fresh process, this package imported only to register the TopK class
        "import json, sys; import sae_vision_ext; from sae_lens import SAE\n"
        f"sae = SAE.load_from_disk({str(tmp_path / 'run' / 'blocks.1.ln2.hook_normalized')!r})\n"
        "m = sae.cfg.metadata\n"
        "print(json.dumps([type(sae).__name__, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_out, sae.cfg.d_sae, m.hook_name,"
        " m.hook_name_out]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [
        "TopKTranscoder",
        8,
        128,
        128,
        256,
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
    ]
    pixels, labels = held_out
    m = evaluate_transcoders(model, list(out.values()), pixels, labels)
    assert set(m["layers"]) == {"blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"}
    assert m["fvu"] < 0.6, m["layers"]  # the mean over layers predicts FVU 1; trained, far below
    assert 0 < m["l0"] <= 8
    assert m["kl_replaced"] < m["kl_ablated"] and m["loss_recovered"] > 0.3, m


@pytest.mark.slow
@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("jumprelu", True)])
def test_transcoder_kinds_save_as_saelens_classes(tmp_path, model, activation, skip):
    from sae_lens import SAE, JumpReLUSkipTranscoder, Transcoder

    arch = "skip_transcoder" if skip else "transcoder"
    cfg = _cfg(
        tmp_path, architecture=arch, transcoder_activation=activation, layers=[2], transcoder_input="hook_resid_mid"
    )
    train_saes(cfg, model=model)
    sae = SAE.load_from_disk(tmp_path / "blocks.2.hook_resid_mid")
    assert type(sae) is (JumpReLUSkipTranscoder if skip else Transcoder)
    assert sae.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    if skip:
        assert sae.W_skip.abs().sum() > 0  # the skip was trained (it starts at zero)


@pytest.mark.slow
def test_a_trained_clt_loads_in_circuit_tracer_with_equal_outputs(tmp_path, model, held_out):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt

    from sae_vision_ext.saes.clt import CrossLayerTranscoder
    from sae_vision_ext.saes.evaluate_transcoders import evaluate_transcoders

    cfg = _cfg(tmp_path, architecture="clt", layers=None, transcoder_activation="relu", l1_coefficient=1e-3)
    clt = train_saes(cfg, model=model)["clt"]
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.n_layers == 6 and clt.cfg.model_name == "sve:shapes-vit"
    theirs = ct_load_clt(str(tmp_path / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    pixels, labels = held_out
    _, cache = model.run_with_cache(pixels[:4], names_filter=lambda n: n.endswith("ln2.hook_normalized"))
    x = torch.stack([cache[clt.hook_in_name(j)].flatten(0, 1) for j in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(x), theirs.encode(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(clt(x), theirs.decode(theirs.encode(x).to_sparse()), atol=1e-5, rtol=0)
    m = evaluate_transcoders(model, clt, pixels, labels)
    assert len(m["layers"]) == 6 and m["fvu_pooled"] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["transcoder", "clt"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, model, monkeypatch, architecture):
    from sae_vision_ext._errors import TrainingInterrupted
    from sae_vision_ext.training import checkpoints

    kw = {"architecture": architecture, "layers": None if architecture == "clt" else [0, 1]}
    full = train_saes(_cfg(tmp_path / "full", **kw), model=model)
    cfg = _cfg(tmp_path / "cut", **kw)
    original = checkpoints.CountingStream.__next__

    def next_then_kill(self):
        if self.count == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(checkpoints.CountingStream, "__next__", next_then_kill)
    with pytest.raises(TrainingInterrupted, match="checkpoint saved to"):
        train_saes(cfg, model=model)
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["batches_consumed"] == 5
    resumed = train_saes(cfg, model=model, resume=True)
    for key, done in full.items():
        for name, p in done.state_dict().items():
            torch.testing.assert_close(resumed[key].state_dict()[name], p, atol=1e-5, rtol=1e-4)
    assert not (tmp_path / "cut" / "checkpoints" / "latest").exists()
