"""Splicing SAELens SAEs and transcoders into HookedViT (semantics as SAELens's HookedSAETransformer)."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, images, one_per_adapter
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata

from sae_vision_ext import HookedViT

HOOK = "blocks.0.hook_resid_post"


def random_sae(d_in: int, hook: str = HOOK, model_name: str | None = None, topk: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook, model_name=model_name)
    if topk:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=4 * d_in, k=8, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in, metadata=meta))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


@pytest.fixture(params=one_per_adapter())
def hooked(request) -> HookedViT:
    return HookedViT.from_model(build_native(request.param), model_name=request.param)


@torch.no_grad()
def test_error_term_keeps_output_and_cache_keys_follow_saelens(hooked):
    sae = random_sae(hooked.cfg.d_model, model_name=hooked.cfg.model_name)
    x = images()
    clean, clean_cache = hooked.run_with_cache(x, names_filter=HOOK)
    out, cache = hooked.run_with_cache_with_saes(x, saes=[sae], use_error_term=True)
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)
    for suffix in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                   "hook_sae_error", "hook_sae_output"):  # fmt: skip
        assert f"{HOOK}.{suffix}" in cache, suffix
    resid = clean_cache[HOOK]
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], resid)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], sae.decode(sae.encode(resid)))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], resid, atol=1e-5, rtol=1e-5)
    assert HOOK not in hooked.acts_to_saes(), "the context removed it"


@torch.no_grad()
def test_without_error_term_output_is_reconstruction(hooked):
    sae = random_sae(hooked.cfg.d_model, topk=True)
    x = images()
    clean = hooked(x)
    _, cache = hooked.run_with_cache(x, names_filter=HOOK)
    spliced = hooked.run_with_saes(x, saes=[sae], use_error_term=False)
    recon = sae.decode(sae.encode(cache[HOOK]))
    expected = hooked.run_with_hooks(x, fwd_hooks=[(HOOK, lambda a, hook: recon)])
    torch.testing.assert_close(spliced, expected)
    assert (spliced - clean).abs().max() > 1e-4
    assert (sae.encode(cache[HOOK]) > 0).sum(-1).max() <= 8


@torch.no_grad()
def test_feature_edit_moves_hook_by_its_decoder_row_with_error_term(hooked):
    sae = random_sae(hooked.cfg.d_model)
    x = images()
    hooked.add_sae(sae, use_error_term=True)
    try:
        _, cache = hooked.run_with_cache(x, names_filter=[f"{HOOK}.hook_sae_acts_post", f"{HOOK}.hook_sae_output"])
        acts = cache[f"{HOOK}.hook_sae_acts_post"]
        feature = int(acts[0, 1].argmax())
        a = acts[0, 1, feature]
        assert a > 0

        def zero_feature(t, hook):
            t = t.clone()
            t[0, 1, feature] = 0.0
            return t

        with hooked.hooks(fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_feature)]):
            _, edited = hooked.run_with_cache(x, names_filter=f"{HOOK}.hook_sae_output")
    finally:
        hooked.reset_saes()
    delta = edited[f"{HOOK}.hook_sae_output"] - cache[f"{HOOK}.hook_sae_output"]
    torch.testing.assert_close(delta[0, 1], -a * sae.W_dec[feature], atol=1e-5, rtol=1e-4)
    delta[0, 1] = 0
    assert delta.abs().max() < 1e-6, "only that token moves"


@torch.no_grad()
def test_reset_and_context_restore_previous_sae():
    hooked = HookedViT.from_model(build_native("timm_cls"))
    first, second = random_sae(32, seed=1), random_sae(32, seed=2)
    x = images()
    clean = hooked(x)
    hooked.add_sae(first)
    with_first = hooked(x)
    with hooked.saes([second]):
        assert hooked.acts_to_saes()[HOOK] is second
        assert not torch.allclose(hooked(x), with_first)
    assert hooked.acts_to_saes()[HOOK] is first
    torch.testing.assert_close(hooked(x), with_first)
    hooked.reset_saes()
    assert hooked.acts_to_saes() == {} and type(hooked.hook_dict[HOOK]).__name__ == "HookPoint"
    torch.testing.assert_close(hooked(x), clean)


@torch.no_grad()
def test_transcoder_reads_input_hook_and_replaces_output_hook():
    hooked = HookedViT.from_model(build_native("timm_cls"))
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    tc = Transcoder(TranscoderConfig(d_in=32, d_sae=64, d_out=32, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = images()
    clean, cache = hooked.run_with_cache(x, names_filter=["blocks.0.ln2.hook_normalized"])
    out_err = hooked.run_with_saes(x, saes=[tc], use_error_term=True)
    torch.testing.assert_close(out_err, clean, atol=1e-5, rtol=1e-5)
    _, spliced = hooked.run_with_cache_with_saes(x, saes=[tc], names_filter=lambda n: "hook_mlp_out" in n)
    expected = tc.decode(tc.encode(cache["blocks.0.ln2.hook_normalized"]))
    torch.testing.assert_close(spliced["blocks.0.hook_mlp_out.hook_sae_output"], expected)


def test_saelens_round_trip_then_splice(tmp_path):
    hooked = HookedViT.from_model(build_native("timm_cls"))
    sae = random_sae(32, topk=True)
    sae.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hooked.run_with_saes(x, saes=[loaded]), hooked.run_with_saes(x, saes=[sae]))


def test_mismatch_errors_and_model_name_warning():
    hooked = HookedViT.from_model(build_native("timm_cls"), model_name="timm_cls")
    with pytest.raises(ValueError, match=r"d_in=48 does not match the width 32 of 'blocks.0.hook_resid_post'"):
        hooked.add_sae(random_sae(48))
    with pytest.raises(ValueError, match=r"'blocks.0.hook_resid_psot' is not a hook point.*Did you mean"):
        hooked.add_sae(random_sae(32, hook="blocks.0.hook_resid_psot"))
    with pytest.warns(UserWarning, match="names model 'timm:other'"):
        hooked.add_sae(random_sae(32, model_name="timm:other"))
    hooked.reset_saes()
    hooked.add_sae(random_sae(32, model_name="timm:other"), check_model_name=False)  # no warning
    hooked.reset_saes()
