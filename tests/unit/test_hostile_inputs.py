"""Images, tensors and arguments a user gets wrong: each is converted as documented or refused with a
ValueError naming the value and the fix (docs/hooked_vit.md, "Input checks")."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from helpers import build_native, images, make_sae
from PIL import Image

import sae_vision_ext as sve
from sae_vision_ext import HookedViT
from sae_vision_ext.models.activation_cache import CacheKeyError
from sae_vision_ext.models.ids import canonical_model_id, same_model

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def hooked():
    return HookedViT.from_model(build_native("timm_cls"))


@pytest.fixture(scope="module")
def shapes():
    return sve.make_shapes(3, seed=2)  # uint8 [n, h, w, 3] numpy images


@pytest.fixture(scope="module")
def shapes_model():
    return HookedViT.from_pretrained("sve:shapes-vit")


def pil(array: np.ndarray, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(array).convert(mode)


# ---------------------------------------------------------------------------------------------- preprocess
def test_a_list_of_pil_images_becomes_one_batch_equal_to_each_image_alone(shapes_model, shapes):
    pre = shapes_model.preprocess
    batch = pre([pil(im) for im in shapes.images])
    assert batch.shape == (3, 3, *shapes_model.cfg.image_size)
    for i, im in enumerate(shapes.images):
        torch.testing.assert_close(batch[i], pre(pil(im)), atol=0, rtol=0)


def test_numpy_channels_last_images_and_batches_equal_the_tensor_path(shapes_model, shapes):
    pre = shapes_model.preprocess
    from_tensor = pre(torch.from_numpy(shapes.images).permute(0, 3, 1, 2))  # uint8 [n, 3, h, w]
    torch.testing.assert_close(pre(shapes.images), from_tensor, atol=0, rtol=0)  # numpy NHWC uint8 batch
    torch.testing.assert_close(pre(shapes.images[1]), from_tensor[1], atol=0, rtol=0)  # one HWC image
    torch.testing.assert_close(pre(shapes.images.astype(np.float32) / 255), from_tensor, atol=1e-6, rtol=0)
    torch.testing.assert_close(pre(shapes.tensors()[0]), from_tensor, atol=1e-6, rtol=0)  # float [0, 1]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK"])
def test_pil_images_of_any_mode_are_converted_to_rgb_as_pil_does(shapes_model, shapes, mode):
    image = pil(shapes.images[0], mode)
    out = shapes_model.preprocess(image)
    torch.testing.assert_close(out, shapes_model.preprocess(image.convert("RGB")), atol=0, rtol=0)
    assert out.shape[0] == 3


def test_four_channel_arrays_drop_alpha_with_a_warning_and_one_channel_is_repeated(shapes_model, shapes):
    rgb = shapes.images[0]
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], -1)
    with pytest.warns(UserWarning, match="4 channels; taking them as RGBA and dropping alpha"):
        out = shapes_model.preprocess(rgba)
    torch.testing.assert_close(out, shapes_model.preprocess(rgb), atol=0, rtol=0)
    gray = rgb[..., :1]
    torch.testing.assert_close(
        shapes_model.preprocess(gray), shapes_model.preprocess(np.repeat(gray, 3, -1)), atol=0, rtol=0
    )


def test_preprocessing_twice_warns_that_the_pixels_look_normalised(shapes_model, shapes):
    once = shapes_model.preprocess(shapes.images)
    with pytest.warns(
        UserWarning, match=r"outside \[0, 1\]: it looks already preprocessed.*moves its values by about 2"
    ):
        twice = shapes_model.preprocess(once)
    assert (twice - once).abs().max() > 1.0  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a [0, 1] float image does not warn
        shapes_model.preprocess(shapes.tensors()[0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda im: [], "empty list of images"),
        (lambda im: np.zeros((0, 8, 8, 3), np.uint8), r"empty batch \(0 images\)"),
        (lambda im: torch.from_numpy(im).permute(0, 3, 1, 2).int(), r"torch\.int32; pass uint8 \(0\.\.255\)"),
        (lambda im: torch.from_numpy(im[0]).float() / 255, r"channels-last tensor \(64, 64, 3\).*permute\(2, 0, 1\)"),
        (
            lambda im: torch.from_numpy(im).float() / 255,
            r"channels-last tensor \(3, 64, 64, 3\).*\(0, 3, 1, 2\)",
        ),
        (lambda im: "cat.png", r"is a str; pass a PIL image, a numpy array"),
        (lambda im: np.zeros((2, 2, 2, 2, 3), np.uint8), r"numpy array of shape \(2, 2, 2, 2, 3\)"),
        (lambda im: np.zeros((8, 8, 5), np.uint8), "has 5 channels; this model takes 3"),
        (lambda im: torch.zeros(5), r"tensor of shape \(5,\); expected \[chan, h, w\]"),
    ],
    ids=["empty-list", "empty-batch", "int32", "hwc-tensor", "nhwc-tensor", "path", "5d", "5-channels", "1d"],
)
def test_inputs_preprocess_cannot_read_are_refused_naming_the_fix(shapes_model, shapes, make, match):
    with pytest.raises(ValueError, match=match):
        shapes_model.preprocess(make(shapes.images))


def test_preprocess_follows_the_size_the_model_was_built_for():
    from timm.models.vision_transformer import VisionTransformer

    small = VisionTransformer(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=3)
    model = HookedViT.from_model(small)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    x = model.preprocess(photo)
    assert x.shape == (3, 48, 48)
    torch.testing.assert_close(model(x[None]), small.eval()(x[None]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- forward / cache
WRONG_TYPES = """
import json, torch
from helpers import build_native, images, make_sae
import sae_vision_ext as sve
HOOK = "blocks.0.hook_resid_post"
model = sve.HookedViT.from_model(build_native("timm_cls"))
rrm = sve.ResidualReplacementModel(model.double(), [make_sae("topk", "none", True, hook="blocks.0.hook_resid_post")])
model.float()
cases = {
    "stop_at_layer='3'": lambda: model(images(), stop_at_layer="3"),
    "stop_at_layer=2.5": lambda: model(images(), stop_at_layer=2.5),
    "pos_slice=[0, 1.5]": lambda: model.run_with_cache(images(), names_filter=HOOK, pos_slice=[0, 1.5]),
    "target=2.0": lambda: rrm.attribute_aggregated(images(1).double(), target=2.0),
    "target='3'": lambda: rrm.attribute_aggregated(images(1).double(), target="3"),
    "faithfulness labels [2] for 4 images": lambda: rrm.faithfulness(images(4).double(), torch.tensor([0, 1])),
}
out = {}
for name, run in cases.items():
    try:
        run()
        out[name] = "no error"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wrong_types():
    """Arguments of the wrong type, as a user meets them: without the tests' runtime type checker (its
    TypeCheckError would fire first), in a fresh process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-c", WRONG_TYPES], capture_output=True, text=True, timeout=300, cwd=tests,
        env={**__import__("os").environ, "PYTHONPATH": str(tests)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("stop_at_layer='3'", r"ValueError: stop_at_layer='3' \(str\) must be an int in -2\.\.2"),
        ("stop_at_layer=2.5", r"ValueError: stop_at_layer=2\.5 \(float\) must be an int in -2\.\.2"),
        ("pos_slice=[0, 1.5]", r"ValueError: pos_slice must be an int, a slice or a list of int positions"),
        ("target=2.0", r"TypeError: target must be .*\(for class 2 pass target=2\)"),
        ("target='3'", r"TypeError: target must be .*got '3' \(str\)"),
        ("faithfulness labels [2] for 4 images", r"ValueError: labels has 2 entries for 4 images"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(wrong_types, case, match):
    assert re.match(match, wrong_types[case]), wrong_types[case]


def test_stop_at_layer_true_is_not_layer_1(hooked):
    with pytest.raises(ValueError, match=r"stop_at_layer=True \(bool\) must be an int in -2\.\.2"):
        hooked(images(), stop_at_layer=True)


def test_pos_slice_out_of_range_names_the_token_count(hooked):
    n_pos = hooked.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"pos_slice=100 is out of range for {n_pos} token positions.*1 prefix"):
        hooked.run_with_cache(images(), names_filter=HOOK, pos_slice=100)
    _, full = hooked.run_with_cache(images(), names_filter=HOOK)
    _, last = hooked.run_with_cache(images(), names_filter=HOOK, pos_slice=[-1, 0])
    torch.testing.assert_close(last[HOOK], full[HOOK][:, [n_pos - 1, 0]])


def test_a_names_filter_that_matches_nothing_is_refused(hooked):
    with pytest.raises(ValueError, match=r"names_filter matches none of this model's \d+ hook points"):
        hooked.run_with_cache(images(), names_filter=lambda name: name.endswith("hook_resid_psot"))
    with pytest.raises(ValueError, match="names_filter is empty: nothing would be cached"):
        hooked.run_with_cache(images(), names_filter=[])


def test_a_cache_key_typo_names_the_close_keys(hooked):
    _, cache = hooked.run_with_cache(images(), names_filter=[HOOK, "blocks.1.hook_resid_post"])
    with pytest.raises(
        KeyError, match=r"'blocks\.0\.hook_resid_pots' is not in this cache.*'blocks\.0\.hook_resid_post'"
    ):
        cache["blocks.0.hook_resid_pots"]
    with pytest.raises(CacheKeyError, match="names_filter"):
        cache["blocks.1.hook_mlp_out"]  # a real hook that was not cached
    torch.testing.assert_close(cache["resid_post", 0], cache[HOOK])  # TransformerLens's tuple keys still work


# ---------------------------------------------------------------------------------------------- SAEs and labels
def test_an_sae_of_another_width_or_without_hook_is_refused_by_stats_and_eval(hooked):
    wide = make_sae("topk", "none", True, d_in=48, hook=HOOK).float()
    nameless = make_sae("topk", "none", True, d_in=32, hook="").float()
    x = images(4)
    for run in (sve.collect_feature_stats, sve.evaluate_sae):
        with pytest.raises(ValueError, match=rf"SAE d_in=48 does not match the width 32 of '{HOOK}'"):
            run(hooked, wide, x)
        with pytest.raises(ValueError, match=r"no cfg\.metadata\.hook_name.*load_sae\(\.\.\., hook_name=\.\.\.\)"):
            run(hooked, nameless, x)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, 2]), r"labels has 3 entries for 4 images"),
        (torch.tensor([0.0, 1.5, 2.0, 1.0]), "fractional values"),
        (torch.tensor([0, -1, 2, 1]), "labels contain -1; class ids start at 0"),
        (torch.tensor([[0, 1, 2, 1]]), r"must be 1-D .* shape \(1, 4\)"),
    ],
    ids=["short", "fractional", "negative", "2d"],
)
def test_bad_labels_are_refused_before_any_work(hooked, labels, match):
    sae = make_sae("topk", "none", True, d_in=32, hook=HOOK).float()
    for run in (sve.collect_feature_stats, sve.evaluate_sae):
        with pytest.raises(ValueError, match=match):
            run(hooked, sae, images(4), labels)
    with pytest.raises(ValueError, match=r"class 7 but n_classes=5"):
        sve.collect_feature_stats(hooked, sae, images(4), torch.tensor([0, 1, 7, 1]), n_classes=5)


def test_empty_image_sets_are_refused_by_eval_stats_and_circuits(hooked):
    sae = make_sae("topk", "none", True, d_in=32, hook=HOOK).float()
    none = images(4)[:0]
    with pytest.raises(ValueError, match="evaluate_sae got 0 images"):
        sve.evaluate_sae(hooked, sae, none)
    with pytest.raises(ValueError, match="collect_feature_stats got 0 images"):
        sve.collect_feature_stats(hooked, sae, none)
    with pytest.raises(ValueError, match="the iterable of batches was empty"):
        sve.collect_feature_stats(hooked, sae, iter([]))
    rrm = sve.ResidualReplacementModel(hooked.double(), [make_sae("topk", "none", True, hook=HOOK)])
    with pytest.raises(ValueError, match="evaluate_circuit got 0 images"):
        sve.evaluate_circuit(rrm, none.double())
    with pytest.raises(ValueError, match="faithfulness got 0 images"):
        rrm.faithfulness(none.double())
    with pytest.raises(ValueError, match="reference_values needs images to take the median over; got 0"):
        rrm.reference_values(none.double())
    hooked.float()


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [(True, TypeError, "bool"), (-1, ValueError, "negative"),
     (99, ValueError, r"target=99 is out of range: the model has 5 classes \(0\.\.4\)")],
)  # fmt: skip
def test_the_aggregated_graph_checks_its_target(hooked, target, error, match):
    rrm = sve.ResidualReplacementModel(hooked.double(), [make_sae("topk", "none", True, hook=HOOK)])
    with pytest.raises(error, match=match):
        rrm.attribute_aggregated(images(1).double(), target=target)
    hooked.float()


# ---------------------------------------------------------------------------------------------- model ids
@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32", "open-clip:laion/CLIP-ViT-B-32", True),  # ViT-Prisma's spelling
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32", True),  # open_clip's own
        ("timm:timm/vit_base_patch16_224", "timm:vit_base_patch16_224", True),
        ("open_clip:ViT-B-32/openai", "open_clip:hf-hub:ViT-B-32/openai", False),  # a tag is not a Hub repo
        ("timm:vit_base_patch16_224", "timm:vit_small_patch16_224", False),
    ],
)
def test_one_model_spelled_two_ways_is_one_model(a, b, same):
    assert same_model(a, b) is same
    assert (canonical_model_id(a) == canonical_model_id(b)) is same


def test_splicing_an_sae_named_in_another_spelling_does_not_warn_but_another_model_does():
    model = HookedViT.from_model(build_native("open_clip_tok"), model_name="open-clip:laion/CLIP-ViT-B-32")
    sae = make_sae("topk", "none", True, d_in=model.cfg.d_model, hook=HOOK).float()
    sae.cfg.metadata.model_name = "open_clip:hf-hub:laion/CLIP-ViT-B-32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_sae(sae)
    model.reset_saes()
    sae.cfg.metadata.model_name = "open_clip:hf-hub:laion/CLIP-ViT-L-14"
    with pytest.warns(UserWarning, match="SAE metadata names model 'open_clip:hf-hub:laion/CLIP-ViT-L-14'"):
        model.add_sae(sae)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("value", "match"), [("a,b", "not a comma-separated list"), ("0,0", "distinct"), ("-1", "distinct")]
)
def test_cli_layers_are_parsed_before_any_work(capsys, value, match):
    from sae_vision_ext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "sve:shapes-vit", "--layers", value])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
