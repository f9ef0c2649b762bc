"""Hostile `sae-vision` arguments: each is refused with a message naming the value, what is valid and
the fix, before any expensive work (model load, harvest, attribution). Also issue 25: every option has
help text that shows its default."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import sae_vision_ext.saes.loading
from sae_vision_ext.cli import build_parser, main
from sae_vision_ext.models import HookedViT

TRACE = ["trace", "--model", "sve:shapes-vit", "--saes", "sve"]

# argparse refuses these: SystemExit(2) and "argument --flag: ..." on stderr
PARSER_CASES = [
    ("trace-target-negative", [*TRACE, "--out", "t", "--target", "-1"], r"--target: class ids count from 0"),
    ("trace-target-float", [*TRACE, "--out", "t", "--target", "2.0"], r"--target: expected a class id .*'2\.0'"),
    ("trace-shapes-index-negative", [*TRACE, "--out", "t", "--shapes-index", "-1"], r"--shapes-index: must be >= 0"),
    (
        "trace-node-threshold",
        [*TRACE, "--out", "t", "--node-threshold", "1.5"],
        r"--node-threshold: must be in \[0, 1\]",
    ),
    ("trace-reference-images", [*TRACE, "--out", "t", "--reference-images", "-3"], r"--reference-images: must be >= 0"),
    (
        "eval-n-images-0",
        ["eval", "--model", "sve:shapes-vit", "--saes", "sve", "--n-images", "0"],
        r"--n-images: must be >= 1",
    ),
    ("faithfulness-n-images-0", ["faithfulness", *TRACE[1:], "--n-images", "0"], r"--n-images: must be >= 1"),
    (
        "dashboard-n-images-x",
        ["dashboard", "--model", "m", "--saes", "s", "--out", "o", "--n-images", "x"],
        r"expected a whole number >= 1 .*'x'",
    ),
    (
        "dashboard-top-k-0",
        ["dashboard", "--model", "m", "--saes", "s", "--out", "o", "--top-k", "0"],
        r"--top-k: must be >= 1",
    ),
    ("demo-batch-size-0", ["demo", "--batch-size", "0"], r"--batch-size: must be >= 1"),
    ("analyse-threshold-2", ["analyse", "--out", "a", "--threshold", "2"], r"--threshold: must be in \(0\.5, 1\]"),
    (
        "analyse-threshold-chance",
        ["analyse", "--out", "a", "--threshold", "0.5"],
        r"--threshold: must be in \(0\.5, 1\]",
    ),
    ("analyse-threshold-nan", ["analyse", "--out", "a", "--threshold", "nan"], r"--threshold: must be in \(0\.5, 1\]"),
    ("analyse-n-images-0", ["analyse", "--out", "a", "--n-images", "0"], r"--n-images: must be >= 1"),
]


@pytest.mark.parametrize(("argv", "match"), [r[1:] for r in PARSER_CASES], ids=[r[0] for r in PARSER_CASES])
def test_parser_refuses_bad_values(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sae-vision" in err
    assert re.search(match, err), err


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model (or an SAE) fails the test: the refusals below must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before the arguments were checked")

    monkeypatch.setattr(HookedViT, "from_pretrained", boom)
    monkeypatch.setattr(sae_vision_ext.saes.loading, "load_sae", boom)


@pytest.fixture
def hostile_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "notes.txt.png").write_text("meeting notes, not pixels")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "adir").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    return tmp_path


# checked by the commands before any model loads: return code 2 and "sae-vision CMD: error: ..."
PREFLIGHT_CASES = [
    ("trace-out-under-a-file", [*TRACE, "--out", "afile/x"], r"--out 'afile/x' cannot be created: 'afile' is a file"),
    ("trace-out-is-a-file", [*TRACE, "--out", "afile"], r"--out 'afile' is a file, not a folder"),
    ("trace-out-subfolder-is-a-file", [*TRACE, "--out", "."], r"--out '.*circuit-tracer' is a file"),
    (
        "trace-image-not-an-image",
        [*TRACE, "--out", "t", "--image", "notes.txt.png"],
        r"--image 'notes.txt.png' is not an image PIL can read",
    ),
    (
        "trace-image-truncated",
        [*TRACE, "--out", "t", "--image", "truncated.png"],
        r"--image 'truncated.png' is not an image",
    ),
    ("trace-image-missing", [*TRACE, "--out", "t", "--image", "nope.png"], r"--image 'nope.png': no such file"),
    ("trace-image-folder", [*TRACE, "--out", "t", "--image", "adir"], r"--image 'adir': a folder"),
    (
        "trace-labels-a-list",
        [*TRACE, "--out", "t", "--labels", "list.json"],
        r"--labels 'list.json': not a labels.json of \{hook",
    ),
    (
        "trace-labels-broken",
        [*TRACE, "--out", "t", "--labels", "broken.json"],
        r"--labels 'broken.json': not a readable",
    ),
    ("analyse-out-is-a-file", ["analyse", "--out", "afile"], r"--out 'afile' is a file, not a folder"),
    (
        "analyse-n-images-1",
        ["analyse", "--out", "a", "--n-images", "1"],
        r"--n-images 1: .* miss the class\(es\) .*AUROCs are undefined.*the minimum is 9 images",
    ),
    (
        "analyse-n-images-8",
        ["analyse", "--out", "a", "--n-images", "8"],
        r"miss the class\(es\) cross, .*seed 31 the minimum is 9",
    ),
    (
        "dashboard-out-under-a-file",
        ["dashboard", "--model", "sve:shapes-vit", "--saes", "sve", "--out", "afile/d"],
        r"--out 'afile/d' cannot be created",
    ),
    (
        "eval-out-under-a-file",
        ["eval", "--model", "sve:shapes-vit", "--saes", "sve", "--out", "afile/e"],
        r"--out 'afile/e' cannot be created",
    ),
    ("demo-out-under-a-file", ["demo", "--out", "afile/demo"], r"--out 'afile/demo' cannot be created"),
    (
        "train-output-dir-under-a-file",
        ["train", "--output-dir", "afile/run"],
        r"--output-dir 'afile/run' cannot be created",
    ),
    ("cache-cache-dir-is-a-file", ["cache", "--cache-dir", "afile"], r"--cache-dir 'afile' is a file"),
]


@pytest.mark.parametrize(("argv", "match"), [r[1:] for r in PREFLIGHT_CASES], ids=[r[0] for r in PREFLIGHT_CASES])
def test_refused_before_any_work(argv, match, hostile_files, no_work, capsys):
    if argv[-1] == ".":  # an output folder whose circuit-tracer subfolder is taken by a file
        (hostile_files / "circuit-tracer").write_text("x")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sae-vision {argv[0]}: error: ") and re.search(match, err), err
    assert not (hostile_files / "t").exists() and not (hostile_files / "a").exists()  # nothing written


def test_trace_target_out_of_range_names_the_classes_before_the_saes_load(tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise AssertionError("SAEs loaded before --target was checked")

    monkeypatch.setattr(sae_vision_ext.saes.loading, "load_sae", boom)
    assert main([*TRACE, "--out", str(tmp_path), "--target", "99"]) == 2
    err = capsys.readouterr().err
    assert "--target 99: sve:shapes-vit has 6 classes, so class ids run 0..5 (circle, square, triangle" in err


def test_trace_shapes_index_renders_only_that_image(tmp_path, monkeypatch):
    """A large --shapes-index renders one image, not index + 1 of them (the image is the same)."""
    from sae_vision_ext.circuits.models import ResidualReplacementModel
    from sae_vision_ext.data.sources import ShapesImages

    rendered, seen = [], {}
    get = ShapesImages.__getitem__
    monkeypatch.setattr(ShapesImages, "__getitem__", lambda self, i: rendered.append(i) or get(self, i))

    def stop(self, pixels, **kwargs):
        seen["pixels"] = pixels
        raise ValueError("stopped after the image")

    monkeypatch.setattr(ResidualReplacementModel, "attribute", stop)
    assert main([*TRACE, "--out", str(tmp_path), "--shapes-index", "50000"]) == 2
    model = HookedViT.from_pretrained("sve:shapes-vit")
    assert rendered == [50000]
    assert torch.equal(seen["pixels"][0], ShapesImages(50001, model.preprocess, seed=4242)[50000])


# the library side of --target: Attributor.attribute refuses what is not a target before its forward
LIBRARY_TARGETS = [
    ("float-2.0", 2.0, TypeError, r"target must be None .*got 2\.0 \(float\) \(for class 2 pass target=2\)"),
    ("bool", True, TypeError, r"target must be None .*got True \(bool\)"),
    ("string", "2", TypeError, r"target must be None .*got '2' \(str\)"),
    ("negative", -1, ValueError, r"target=-1 is negative; class ids count from 0"),
    (
        "out-of-range",
        99,
        ValueError,
        r"target=99 is not a class of this model: it has 6 outputs, so class ids run 0\.\.5",
    ),
    ("int-tensor-of-two", torch.tensor([1, 2]), TypeError, r"got a torch\.int64 tensor of shape \[2\]"),
    ("wrong-width", torch.ones(5), ValueError, r"target directions have shape \[5\]; the model has 6 outputs"),
    ("non-finite", torch.full((6,), float("nan")), ValueError, r"must be non-empty and finite; .*6 non-finite"),
]


@pytest.mark.parametrize(
    ("target", "error", "match"), [r[1:] for r in LIBRARY_TARGETS], ids=[r[0] for r in LIBRARY_TARGETS]
)
def test_target_resolution_refuses_bad_targets(target, error, match):
    """What ``attribute(target=...)`` raises for a user (the tests' runtime type checker would catch the
    float and the string at the signature first, so the check and the resolution it runs are called
    directly)."""
    from sae_vision_ext.circuits.graph.ops import check_target, resolve_targets
    from sae_vision_ext.data.shapes import SHAPES

    with pytest.raises(error, match=match):
        resolve_targets(SHAPES, torch.zeros(1, 6), check_target(target), None)


@pytest.fixture(scope="module")
def shapes_rrm():
    from sae_vision_ext.circuits.models import ResidualReplacementModel
    from sae_vision_ext.data.shapes import make_shapes

    model = HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sae_vision_ext.saes.loading.load_sae(f"sve:shapes-vit/blocks.{i}.hook_resid_post") for i in range(6)]
    return ResidualReplacementModel(model, saes), model.preprocess(make_shapes(1, seed=3).tensors()[0])


BEFORE_FORWARD = [
    ("bool", True, TypeError),
    ("negative", -1, ValueError),
    ("nan", torch.full((6,), torch.nan), ValueError),
]


@pytest.mark.parametrize(("target", "error"), [r[1:] for r in BEFORE_FORWARD], ids=[r[0] for r in BEFORE_FORWARD])
def test_attribute_checks_its_target_before_the_forward(shapes_rrm, monkeypatch, target, error):
    from sae_vision_ext.circuits.engine.attribution import Attributor

    def boom(*args, **kwargs):
        raise AssertionError("the forward ran before the target was checked")

    monkeypatch.setattr(Attributor, "_record", boom)
    rrm, pixels = shapes_rrm
    with pytest.raises(error, match="target"):
        rrm.attribute(pixels, target=target, max_feature_nodes=0)


def test_attribute_reads_a_one_element_integer_tensor_as_a_class_id(shapes_rrm):
    rrm, pixels = shapes_rrm
    graph = rrm.attribute(pixels, target=torch.tensor(2), max_feature_nodes=0)
    assert graph.target_names == ["triangle"]
    with pytest.raises(ValueError, match=r"target=99 is not a class of this model: it has 6 outputs"):
        rrm.attribute(pixels, target=99, max_feature_nodes=0)


def _options():
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action, formatter


@pytest.mark.parametrize(
    ("command", "action", "formatter"), list(_options()), ids=[f"{c}:{a.dest}" for c, a, _ in _options()]
)
def test_every_option_has_help_showing_its_default(command, action, formatter):
    """Issue 25: `sae-vision CMD --help` explains every option and shows its default."""
    text = formatter._expand_help(action) if action.help else ""
    assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    shown = "(required)" if action.required else "(default: "
    assert shown in text, f"{command} {action.option_strings}: {text!r} does not show its default"
    if action.default not in (None, argparse.SUPPRESS) and not action.required:
        assert str(action.default) in text
