"""Commands of the training pipeline: cache, train, eval."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from ._shared import RANDOM_WEIGHTS_TAG, _load_images, _sae_refs, load_model


class _NoneGiven:
    """What the flag of an optional field (``int | None``, ...) parses ``none``/``null`` to: the field is
    set to ``None`` (a flag's own default ``None`` means "not given": the config file's value stays)."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneGiven()


def _or_none(typ: type) -> Callable[[str], Any]:
    """An argparse type for an optional field: ``none``/``null`` give :data:`NONE` (set to ``None``)."""

    def parse(text: str) -> Any:
        return NONE if text.strip().lower() in ("none", "null") else typ(text)

    parse.__name__ = f"{typ.__name__}|none"
    return parse


def _hook_names(text: str) -> str | list[str]:
    """``--hook-names``: one name or group, or a comma-separated list of names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names[0] if len(names) == 1 else names


_CONFIG_FLAGS: dict[str, Any] = {  # every scalar config field, settable by flag, with its type (bool: --x/--no-x)
    "model_name": str,
    "hook_names": _hook_names,
    "dataset": str,
    "n_images": int,
    "token_selection": str,
    "patches_per_image": _or_none(int),
    "architecture": str,
    "transcoder_activation": str,
    "transcoder_input": str,
    "transcoder_decoder_init_norm": float,
    "d_sae": _or_none(int),
    "expansion_factor": float,
    "k": int,
    "l1_coefficient": float,
    "b_dec_init": str,
    "b_dec_init_tokens": int,
    "decoder_init_norm": _or_none(float),
    "aux_coefficient": float,
    "k_aux": _or_none(int),
    "dead_feature_window_tokens": _or_none(int),
    "normalize_activations": str,
    "lr": _or_none(float),
    "lr_end": _or_none(float),
    "lr_scheduler_name": str,
    "lr_warm_up_steps": int,
    "train_batch_size": int,
    "training_tokens": int,
    "image_batch_size": int,
    "shuffle_buffer_tokens": int,
    "cache_in_memory_gb": float,
    "num_workers": int,
    "device": str,
    "dtype": str,
    "seed": int,
    "init_seed": _or_none(int),
    "cache_dir": _or_none(str),
    "cache_dtype": str,
    "images_per_shard": int,
    "output_dir": str,
    "n_checkpoints": int,
    "checkpoint_every_tokens": _or_none(int),
    "checkpoint_every_seconds": _or_none(float),
    "stream": bool,
    "data_parallel": bool,
    "log_to_wandb": bool,
    "wandb_project": str,
}
YAML_ONLY = ("per_layer",)
"""Config fields without a flag (mappings): set them in the --config file. ``layers`` is ``--layers``."""


def _training_config(args: argparse.Namespace):
    from ..training.config import VisionSAETrainingConfig

    base = VisionSAETrainingConfig.from_file(args.config).to_dict() if args.config else {}
    if getattr(args, "model_name_deprecated", None):
        warnings.warn(
            "--model-name is deprecated; use --model (as every command does).", DeprecationWarning, stacklevel=1
        )
        if args.model_name is None:
            args.model_name = args.model_name_deprecated
    for key in _CONFIG_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = None if value is NONE else value
    if args.layers:
        base["layers"] = args.layers  # parsed and checked by argparse (_layer_list)
    return VisionSAETrainingConfig.from_dict(base)


def _cmd_cache(args: argparse.Namespace) -> int:
    from ..activations.cache import CachedActivations, build_cache, cache_root
    from ..activations.disk import estimate_cache_bytes, free_bytes, human_bytes, tokens_per_image
    from ..activations.harvest import resolve_hook_names
    from ..data.sources import open_image_source
    from ..training.train import cache_settings

    cfg = _training_config(args)
    if cfg.cache_dir is None:
        raise ValueError("Give --cache-dir (or cache_dir in the config) for `sae-vision cache`.")
    rank, _ = _join_process_group(args)
    model = load_model(cfg.model_name, random_weights=args.random_weights, device=cfg.device)
    dataset = open_image_source(cfg.dataset, model.preprocess, cfg.n_images, cfg.seed)
    hooks = resolve_hook_names(cfg.hook_names, model.cfg.n_layers, cfg.layers)
    settings = cache_settings(cfg, hooks, len(dataset))
    if args.random_weights:  # keyed apart from the pretrained model's cache
        settings = dataclasses.replace(settings, model_name=settings.model_name + RANDOM_WEIGHTS_TAG)
    root = cache_root(cfg.cache_dir, settings)
    folder = root / settings.key
    needed, free = estimate_cache_bytes(model, settings), free_bytes(folder)
    print(
        f"cache {folder}: about {human_bytes(needed)} for {settings.n_images} images x "
        f"{tokens_per_image(model, settings)} tokens x {len(hooks)} hook(s) in {settings.dtype}; "
        f"{human_bytes(free)} free there"
    )
    if args.verify and (root / settings.key / "metadata.json").exists():
        problems = CachedActivations(folder, verify=True, allow_incomplete=True).verify_shards(remove=True)
        for problem in problems:
            print(f"removed: {problem}")
        print(
            f"verified {root / settings.key}: {len(problems)} bad shard(s) removed"
            + (", rewriting" if problems else "")
        )
    folder = build_cache(model, dataset, settings, root, cfg.num_workers, image_batch_size=cfg.image_batch_size)
    if rank == 0:
        print(f"cache ready: {folder}")
    return 0


def _join_process_group(args: argparse.Namespace) -> tuple[int, int]:
    """Join torchrun's process group when launched by it (or insist on it with --distributed)."""
    from ..distributed import init_from_env, require_launcher

    return require_launcher() if args.distributed else init_from_env()


def _given_any_config(args: argparse.Namespace) -> bool:
    return bool(args.config or args.layers or any(getattr(args, key, None) is not None for key in _CONFIG_FLAGS))


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from ..training.train import train_saes

    cfg = _training_config(args)
    if not (_given_any_config(args) or args.yes or args.resume):
        print("No config given. `sae-vision train` would run these defaults (all fields of VisionSAETrainingConfig):")
        print(json.dumps(cfg.to_dict(), indent=1))
        print("Run them with `sae-vision train --yes`, or pass --config FILE.yaml and/or flags (see --help).")
        return 2
    rank, _ = _join_process_group(args)
    model = None
    if args.random_weights:
        if cfg.cache_dir is not None:
            raise ValueError(
                f"--random-weights with cache_dir={cfg.cache_dir!r}: a random model's activations must not share "
                "the pretrained model's cache key. Train without a cache (drop --cache-dir / cache_dir), or build "
                "one with `sae-vision cache --random-weights` to inspect it."
            )
        model = load_model(cfg.model_name, random_weights=True, device=cfg.device)
    saes = train_saes(cfg, model=model, resume=args.resume)
    if rank == 0:
        for hook in saes:
            print(f"saved {hook} -> {cfg.output_dir}/{hook}")
    return 0


def _is_clt(obj: object) -> bool:
    from ..saes.clt import CrossLayerTranscoder

    return isinstance(obj, CrossLayerTranscoder)


def _replaces_mlps(obj: object) -> bool:
    """A transcoder, a list of them or a CLT (``sae-vision eval`` then reports ``evaluate_transcoders``)."""
    if isinstance(obj, list):
        return bool(obj) and all(_replaces_mlps(o) for o in obj)
    return _is_clt(obj) or getattr(getattr(obj, "cfg", None), "metadata", {}).get("hook_name_out") is not None


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..models import HookedViT
    from ..saes.evaluate import evaluate_sae, format_eval_table
    from ..saes.loading import load_sae

    if args.sae:
        warnings.warn(
            "sae-vision eval --sae is deprecated; use --saes a,b,c (as trace and analyse do).",
            DeprecationWarning,
            stacklevel=1,
        )
    if not args.sae and not args.saes:
        raise SystemExit("sae-vision eval needs --saes: 'sve', a folder of SAE folders, or refs a,b,c.")
    model = HookedViT.from_pretrained(args.model)
    refs = list(args.sae or []) + (_sae_refs(args.saes, args.model, model.cfg.n_layers) if args.saes else [])
    images, labels, _ = _load_images(model, args.dataset, args.n_images, args.seed)
    for ref in refs:
        sae = load_sae(ref, hook_name=args.hook_name)
        if _replaces_mlps(sae):  # transcoders (one, a list) or a CLT: the model with its MLPs replaced
            from ..saes.evaluate_transcoders import evaluate_transcoders

            metrics = evaluate_transcoders(
                model, sae if isinstance(sae, list) or _is_clt(sae) else [sae], images, labels
            )
            layers = metrics.pop("layers")
            metrics |= {f"fvu {out}": v["fvu"] for out, v in layers.items()}
            print(f"\n## {ref}\n\n{format_eval_table(metrics)}")
            continue
        out = None if args.out is None else f"{args.out}/{sae.cfg.metadata.hook_name}.json"
        metrics = evaluate_sae(model, sae, images, labels, out_path=out, progress=True)
        print(f"\n## {ref}\n\n{format_eval_table(metrics)}")
    return 0
