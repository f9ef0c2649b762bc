"""`sae-vision cache|train` flags: every scalar VisionSAETrainingConfig field has one (issue 26: --data-parallel,
--stream, ... were YAML-only), it reaches the config, and its help is the field's docstring with the default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sae_vision_ext.cli import build_parser
from sae_vision_ext.cli.training import _CONFIG_FLAGS, YAML_ONLY, _training_config
from sae_vision_ext.training.config import VisionSAETrainingConfig

GIVEN = {  # a valid non-default value of every flag, all together one consistent config
    "model_name": ("sve:shapes-vit-biased", "sve:shapes-vit-biased"),
    "hook_names": ("blocks.0.hook_resid_post,blocks.2.hook_mlp_out",
                   ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]),
    "dataset": ("wds:/data/s-{000..003}.tar", "wds:/data/s-{000..003}.tar"),
    "n_images": ("77", 77),
    "token_selection": ("patches", "patches"),
    "patches_per_image": ("5", 5),
    "architecture": ("standard", "standard"),
    "transcoder_activation": ("relu", "relu"),
    "transcoder_input": ("hook_resid_mid", "hook_resid_mid"),
    "transcoder_decoder_init_norm": ("0.25", 0.25),
    "d_sae": ("96", 96),
    "expansion_factor": ("2.5", 2.5),
    "k": ("7", 7),
    "l1_coefficient": ("0.5", 0.5),
    "b_dec_init": ("zeros", "zeros"),
    "b_dec_init_tokens": ("999", 999),
    "decoder_init_norm": ("none", None),
    "aux_coefficient": ("0.125", 0.125),
    "k_aux": ("33", 33),
    "dead_feature_window_tokens": ("4096", 4096),
    "normalize_activations": ("layer_norm", "layer_norm"),
    "lr": ("3e-3", 3e-3),
    "lr_end": ("1e-5", 1e-5),
    "lr_scheduler_name": ("cosineannealing", "cosineannealing"),
    "lr_warm_up_steps": ("11", 11),
    "train_batch_size": ("512", 512),
    "training_tokens": ("123456", 123456),
    "image_batch_size": ("9", 9),
    "shuffle_buffer_tokens": ("4096", 4096),
    "cache_in_memory_gb": ("0", 0.0),
    "num_workers": ("2", 2),
    "device": ("cuda:1", "cuda:1"),
    "dtype": ("float64", "float64"),
    "seed": ("5", 5),
    "init_seed": ("6", 6),
    "cache_dir": ("null", None),
    "cache_dtype": ("bfloat16", "bfloat16"),
    "images_per_shard": ("13", 13),
    "output_dir": ("runs/x", "runs/x"),
    "n_checkpoints": ("2", 2),
    "checkpoint_every_tokens": ("8192", 8192),
    "checkpoint_every_seconds": ("none", None),
    "stream": (None, True),
    "data_parallel": (None, True),
    "log_to_wandb": (None, True),
    "wandb_project": ("p", "p"),
}  # fmt: skip


def _flag(key: str) -> str:
    return "--model" if key == "model_name" else f"--{key.replace('_', '-')}"


def test_every_scalar_config_field_has_a_flag():
    fields = {f.name for f in dataclasses.fields(VisionSAETrainingConfig)}
    missing = sorted(fields - set(_CONFIG_FLAGS) - set(YAML_ONLY) - {"layers"})
    assert not missing, f"config fields without a flag in cli/training.py _CONFIG_FLAGS: {missing}"
    assert set(GIVEN) == set(_CONFIG_FLAGS)


@pytest.mark.parametrize("command", ["train", "cache"])
def test_every_flag_reaches_the_config(command):
    argv = [command]
    for key, (text, _) in GIVEN.items():
        argv += [_flag(key)] if text is None else [_flag(key), text]
    cfg = _training_config(build_parser().parse_args(argv))
    assert {key: getattr(cfg, key) for key in GIVEN} == {key: value for key, (_, value) in GIVEN.items()}
    off = _training_config(build_parser().parse_args([command, "--no-data-parallel", "--no-stream"]))
    assert (off.data_parallel, off.stream, off.checkpoint_every_seconds) == (False, False, 300.0)


def test_flags_override_the_config_file_and_unset_flags_keep_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data_parallel: true\ncache_dir: /c\ncheckpoint_every_seconds: 60\nk: 4\n")
    cfg = _training_config(
        build_parser().parse_args(["train", "--config", str(path), "--checkpoint-every-seconds", "none"])
    )
    assert (cfg.data_parallel, cfg.cache_dir, cfg.checkpoint_every_seconds, cfg.k) == (True, "/c", None, 4)
    cfg = _training_config(build_parser().parse_args(["train", "--config", str(path), "--no-data-parallel"]))
    assert (cfg.data_parallel, cfg.cache_dir) == (False, "/c")


def test_help_of_a_config_flag_is_its_docstring_with_the_default():
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["train"].format_help()
    flat = " ".join(text.split())
    assert "--data-parallel, --no-data-parallel Under torchrun, train every SAE on every rank" in flat
    assert "--stream, --no-stream Harvest straight into training" in flat
    assert "(default: the --config file's value, else False)" in flat
    assert "hf-dataset:<name or path>" in flat  # the dataset field's docstring, not a stale copy
    assert (
        "per_layer: file only" in flat
        and "Pass none for None. (default: the --config file's value, else 300.0)" in flat
    )
