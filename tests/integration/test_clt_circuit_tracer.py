"""Our cross-layer transcoder files against circuit-tracer 0.5.0's own CrossLayerTranscoder (installed
without its dependencies): a CLT we write loads in its ``load_clt`` with equal outputs, and a CLT its
``to_safetensors`` writes loads in ours with equal outputs (relu and jumprelu, with and without skip)."""

from __future__ import annotations

import json

import pytest
import torch

from sae_vision_ext.saes.clt import CLTConfig, CrossLayerTranscoder, load_clt, save_clt
from sae_vision_ext.saes.loading import load_sae

N_LAYERS, D_MODEL, D_SAE = 3, 8, 12
ACTIVATIONS = [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)]


def random_clt(activation: str, skip: bool, seed: int = 0) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(
        CLTConfig(D_MODEL, D_SAE, N_LAYERS, activation=activation, skip_connection=skip, k=4, model_name="sve:x")
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if clt.threshold is not None:
            clt.threshold.abs_()
    return clt


def ct_module():
    from circuit_tracer.transcoder import cross_layer_transcoder as ct

    return ct


def ct_outputs(ct_clt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's encode and reconstruction (its ``decode`` with the inputs for the skip term:
    its ``forward`` passes none to ``decode`` and fails on skip CLTs in 0.5.0)."""
    acts = ct_clt.encode(x)
    recon = ct_clt.decode(acts.to_sparse(), input_acts=x if ct_clt.W_skip is not None else None)
    return acts, recon


def inputs(seed: int = 1, n_pos: int = 5) -> torch.Tensor:
    return torch.randn(N_LAYERS, n_pos, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("activation", "skip"), ACTIVATIONS)
def test_a_clt_we_write_loads_in_circuit_tracer_with_equal_outputs(tmp_path, activation, skip):
    ct = ct_module()
    ours = random_clt(activation, skip)
    save_clt(ours, tmp_path / "clt")
    theirs = ct.load_clt(str(tmp_path / "clt"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert theirs.n_layers == N_LAYERS and theirs.d_transcoder == D_SAE
    assert isinstance(theirs.activation_function, ct.JumpReLU) == (activation == "jumprelu")
    if skip:  # circuit-tracer 0.5.0's load_clt reads no W_skip: put ours in through its own state dict
        assert theirs.W_skip is None
        with torch.device("meta"):
            theirs = ct.CrossLayerTranscoder(
                N_LAYERS, D_SAE, D_MODEL, activation_function="jump_relu" if activation == "jumprelu" else "relu",
                skip_connection=True, lazy_decoder=False, dtype=torch.float32,
            )  # fmt: skip
        theirs.load_state_dict(ours.circuit_tracer_state_dict(), assign=True)
    x = inputs()
    acts, recon = ct_outputs(theirs, x)
    with torch.no_grad():
        our_acts, our_recon = ours.encode(x), ours(x)
    assert (our_acts > 0).float().mean() > 0.2  # a real comparison: many active features
    torch.testing.assert_close(our_acts, acts, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_recon, recon, atol=1e-6, rtol=0)
    for layer in range(N_LAYERS):  # circuit-tracer's per-layer encoder equals ours
        torch.testing.assert_close(
            ours.encode_layer(x[layer], layer), theirs.encode_layer(x[layer], layer), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(("activation", "skip"), ACTIVATIONS)
def test_a_clt_circuit_tracer_writes_loads_in_ours_with_equal_outputs(tmp_path, activation, skip):
    ct = ct_module()
    theirs = ct.CrossLayerTranscoder(
        N_LAYERS, D_SAE, D_MODEL, activation_function="jump_relu" if activation == "jumprelu" else "relu",
        skip_connection=skip, lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if activation == "jumprelu":
            theirs.activation_function.threshold.abs_()
    theirs.to_safetensors(str(tmp_path / "ct"))
    assert not (tmp_path / "ct" / "clt_config.json").exists()  # circuit-tracer's own files only
    if skip:  # circuit-tracer writes no W_skip: add it as our W_skip_{i} files
        from safetensors.torch import save_file

        for i in range(N_LAYERS):
            save_file({f"W_skip_{i}": theirs.W_skip[i].detach().clone()}, tmp_path / "ct" / f"W_skip_{i}.safetensors")
    ours = load_clt(tmp_path / "ct")
    assert ours.cfg.activation == activation and ours.cfg.skip_connection == skip
    assert ours.cfg.hook_in == "hook_resid_mid"  # circuit-tracer's default
    x = inputs(seed=5)
    acts, recon = ct_outputs(theirs, x)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), acts, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), recon, atol=1e-6, rtol=0)
    assert recon.abs().mean() > 0.1


def test_load_sae_detects_the_clt_format_and_the_config_round_trips(tmp_path):
    ours = random_clt("topk", True)
    save_clt(ours, tmp_path / "clt")
    stored = json.loads((tmp_path / "clt" / "clt_config.json").read_text())
    assert stored["format"] == "circuit_tracer_clt" and stored["k"] == 4
    loaded = load_sae(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder)
    assert loaded.cfg == ours.cfg
    x = inputs()
    with torch.no_grad():
        acts = loaded.encode(x)
        assert ((acts > 0).sum(-1) <= 4).all() and (acts > 0).sum() > N_LAYERS * 5 * 2
        torch.testing.assert_close(loaded(x), ours(x), atol=0, rtol=0)
        manual = [ours.b_dec[j] + x[j] @ ours.W_skip[j] for j in range(N_LAYERS)]
        for j in range(N_LAYERS):
            manual[j] = manual[j] + sum(acts[i] @ ours.W_dec[i][:, j - i] for i in range(j + 1))
        torch.testing.assert_close(ours(x), torch.stack(manual), atol=1e-6, rtol=0)
    assert loaded.hook_in_name(2) == "blocks.2.ln2.hook_normalized"
    assert loaded.hook_out_name(0) == "blocks.0.hook_mlp_out"


def test_bad_configs_and_folders_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"activation='gelu' is not valid; choose one of \['relu', 'jumprelu', 'topk'\]"
    ):
        CLTConfig(8, 12, 3, activation="gelu")
    with pytest.raises(ValueError, match=r"'topk' needs 0 < k <= d_sae=12, got k=None"):
        CLTConfig(8, 12, 3, activation="topk")
    with pytest.raises(ValueError, match="hook_in='hook_resid_post' is not valid"):
        CLTConfig(8, 12, 3, hook_in="hook_resid_post")
    with pytest.raises(ValueError, match="not a CLT folder"):
        load_clt(tmp_path)
    save_clt(random_clt("relu", False), tmp_path / "clt")
    (tmp_path / "clt" / "W_dec_1.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"W_dec_1\.safetensors is missing, truncated or corrupt"):
        load_clt(tmp_path / "clt")
