"""``HookedViT``: any supported ViT behind TransformerLens hook names, with one generic forward.

The wrapped module is kept as ``HookedViT.wrapped`` and its own parameters are used (no copies that
can drift); the adapter for its family tells the generic forward where each piece lives. Outputs
equal the wrapped model's forward (float32, max abs diff <= 1e-5 relative to the output scale;
``tests/unit/test_parity.py``) with and without hooks.

Hook names (pos = prefix tokens first: CLS, registers, distillation; then patches row-major):
``hook_embed``, ``hook_pos_embed``, ``ln_pre.hook_normalized`` (if the model has ``ln_pre``),
``blocks.{l}.hook_resid_pre``, ``blocks.{l}.ln1.hook_scale|hook_normalized``,
``blocks.{l}.attn.hook_q|hook_k|hook_v|hook_z`` ``[batch, pos, head, d_head]``,
``blocks.{l}.attn.hook_attn_scores|hook_pattern`` ``[batch, head, query_pos, key_pos]``,
``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_resid_mid``, ``blocks.{l}.ln2.*``,
``blocks.{l}.mlp.hook_pre|hook_post`` ``[batch, pos, d_mlp]``, ``blocks.{l}.hook_mlp_out``,
``blocks.{l}.hook_resid_post``, ``ln_final.hook_scale|hook_normalized``, ``hook_pooled``, ``hook_out``.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import adapters as _adapters  # noqa: F401  (registers the built-in adapters)
from . import embedded as _embedded  # noqa: F401  (registers the "sve:" loader)
from .activation_cache import VisionActivationCache
from .adapters.base import LOADERS, ViTAdapter, adapter_for
from .components import HookedBlock, HookedNorm
from .config import HookedViTConfig
from .naflex import ImageSizes, Pixels, image_list, patchify, stack_same_size
from .splicing import SAESplicingMixin

NamesFilter = Callable[[str], bool] | Sequence[str] | str | None
PosSlice = int | slice | Sequence[int] | Tensor | None


class HookedViT(SAESplicingMixin, HookedRootModule):
    """A ViT exposing TransformerLens hooks; ``model(pixels)`` returns the wrapped model's output.

    Build with :meth:`from_pretrained` (``"timm:..."``, ``"open_clip:..."``, ``"hf:..."``,
    ``"sve:..."``) or :meth:`from_model`. The forward is the eval-mode forward (no dropout,
    drop-path or patch dropout), whatever mode the wrapped module is in.

    SAELens SAEs splice in with ``add_sae``, ``saes()``, ``run_with_saes``,
    ``run_with_cache_with_saes`` and ``run_with_hooks_with_saes`` (see ``models/splicing.py``).
    """

    def __init__(self, module: nn.Module, model_name: str | None = None, adapter: ViTAdapter | None = None) -> None:
        super().__init__()
        adapter = adapter or adapter_for(module)
        self.wrapped = module
        self.__dict__["adapter"] = adapter  # plain attribute: its module references are `wrapped`'s own
        self.cfg: HookedViTConfig = adapter.config()
        self.cfg.model_name = model_name or self.cfg.model_name
        with contextlib.suppress(StopIteration):
            self.cfg.device = str(next(module.parameters()).device)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        ln_pre = adapter.ln_pre()
        self.ln_pre = HookedNorm(ln_pre, self.cfg.normalization) if ln_pre is not None else None
        self.blocks = nn.ModuleList(HookedBlock(p, self.cfg.normalization) for p in adapter.blocks())
        ln_final = adapter.ln_final()
        self.ln_final = HookedNorm(ln_final, self.cfg.normalization) if ln_final is not None else None
        self.hook_pooled = HookPoint()
        self.hook_out = HookPoint()
        self.token_mask: Tensor | None = None
        """``[batch, pos]`` bool of the last forward: ``True`` for each image's real tokens (prefix, then its own
        patches), ``False`` for the padding of a NaFlex batch of mixed sizes (all ``True`` otherwise)."""
        self.grid_sizes: list[tuple[int, int]] = []
        """``(rows, cols)`` of each image's patch grid in the last forward."""
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, module: nn.Module, model_name: str | None = None) -> HookedViT:
        """Wrap an already-built timm, open_clip or Hugging Face ViT (a CLIP model: its ``.visual``)."""
        visual = getattr(module, "visual", None)
        if isinstance(visual, nn.Module):
            try:
                adapter_for(module)
            except ValueError:
                module = visual
        return cls(module, model_name=model_name or f"{type(module).__name__}")

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        pretrained: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> HookedViT:
        """Load ``"<source>:<name>"``; sources: ``timm``, ``open_clip``, ``hf``, ``sve`` (embedded).

        ``pretrained=False`` builds the same architecture with random weights and downloads nothing.
        Extra keyword arguments go to the source's loader (e.g. timm's ``num_classes``).
        """
        prefix, sep, name = model_id.partition(":")
        if not sep or not name:
            raise ValueError(
                f"Model id {model_id!r} has no source prefix. Write '<source>:<name>' with source one of "
                f"{LOADERS.names()}, e.g. 'timm:vit_base_patch16_224' or 'sve:shapes-vit'."
            )
        module = LOADERS.get(prefix)(name, pretrained=pretrained, **kwargs)
        model = cls.from_model(module, model_name=model_id)
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
            model.cfg.device = str(device or model.cfg.device)
        return model

    def setup(self) -> None:
        """TransformerLens's setup over this module's own hook points only (``wrapped`` is left alone)."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if name == "" or name == "wrapped" or name.startswith("wrapped."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module
        after_pool = {"ln_final.hook_scale", "ln_final.hook_normalized"} if self.cfg.final_norm_after_pool else set()
        self._no_pos_hooks = {"hook_pooled", "hook_out"} | after_pool

    # ------------------------------------------------------------------ forward
    @property
    def image_size(self) -> tuple[int, int]:
        return self.cfg.image_size

    check_finite_inputs: bool = True
    """Reject NaN/inf pixels in every forward (one ``isfinite`` pass); set ``False`` to skip the check."""

    def check_input(self, pixels: Tensor, check_finite: bool | None = None) -> Tensor:
        """``pixels`` as this model takes them, or ``ValueError`` naming what is wrong and the fix (shape,
        channels-last layout, integer dtype, size, empty batch, NaN/inf). Floating dtypes are cast to
        the model's dtype."""
        cfg = self.cfg
        if not isinstance(pixels, Tensor) or pixels.ndim != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(
                f"Expected images as a [batch, channels, height, width] tensor, got {shape}. "
                "Use model.preprocess on PIL images and torch.stack the results; add a batch dim with x[None]."
            )
        if pixels.shape[0] == 0:
            raise ValueError("Got an empty batch (0 images); pass at least one image.")
        if pixels.shape[1] != cfg.in_chans:
            hint = (
                " The tensor looks channels-last [batch, height, width, channels]: use pixels.permute(0, 3, 1, 2)."
                if pixels.shape[-1] == cfg.in_chans
                else ""
            )
            raise ValueError(
                f"Expected {cfg.in_chans} channels, got {pixels.shape[1]} (shape {tuple(pixels.shape)}).{hint}"
            )
        if not pixels.is_floating_point():
            raise ValueError(
                f"Images are {pixels.dtype}: raw pixel values, not the model's normalised input. Use model.preprocess "
                "on PIL images or uint8 tensors (it scales them by 1/255 and normalises)."
            )
        h, w = pixels.shape[-2:]
        if cfg.dynamic_img_size:
            if h % cfg.patch_size or w % cfg.patch_size:
                raise ValueError(f"Image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}.")
        elif (h, w) != tuple(cfg.image_size):
            raise ValueError(
                f"Image size {h}x{w} does not match the model's {cfg.image_size[0]}x{cfg.image_size[1]}. "
                "Resize with model.preprocess (or torch.nn.functional.interpolate)."
            )
        if (self.check_finite_inputs if check_finite is None else check_finite) and not torch.isfinite(pixels).all():
            bad = (~torch.isfinite(pixels)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"Images {bad[:10]}{'...' if len(bad) > 10 else ''} of the batch contain NaN or inf values; fix or "
                "drop them (model.check_finite_inputs = False skips this check)."
            )
        dtype = next(self.parameters()).dtype
        return pixels if pixels.dtype == dtype else pixels.to(dtype)

    def forward(
        self,
        pixels: Pixels,
        stop_at_layer: int | None = None,
        check_finite: bool | None = None,
        image_sizes: ImageSizes = None,
    ) -> Tensor:
        """The wrapped model's output; with ``stop_at_layer=L`` the residual stream before block L.

        ``stop_at_layer`` follows TransformerLens: exclusive, negative counts from the end (``-n_layers
        <= L <= n_layers``), and nothing after block ``L - 1`` is computed. ``pixels`` is ``[batch,
        chan, height, width]``, checked by :meth:`check_input` (NaN/inf rejected unless
        ``check_finite=False`` or ``model.check_finite_inputs = False``). NaFlex models (``cfg.naflex``)
        also take a list of ``[chan, h, w]`` images of different sizes, or a padded batch with
        ``image_sizes`` (pixels per image); :attr:`token_mask` and :attr:`grid_sizes` then say which
        tokens are real (``models/naflex.py``).
        """
        n_layers = len(self.blocks)
        if stop_at_layer is not None and (isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int)):
            raise ValueError(
                f"stop_at_layer={stop_at_layer!r} ({type(stop_at_layer).__name__}) must be an int in "
                f"{-n_layers}..{n_layers} (the residual stream before that block) or None."
            )
        if stop_at_layer is not None and not -n_layers <= stop_at_layer <= n_layers:
            raise ValueError(
                f"stop_at_layer={stop_at_layer} is out of range for a {n_layers}-layer model "
                f"(valid: {-n_layers}..{n_layers})."
            )
        a = self.adapter
        tok, pos = self._embed(pixels, image_sizes, check_finite)
        tok = self.hook_embed(tok)
        pos = self.hook_pos_embed(pos.expand(tok.shape[0], -1, -1))
        x = tok + pos
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        n_run = len(self.blocks) if stop_at_layer is None else range(len(self.blocks))[:stop_at_layer].stop
        for block in self.blocks[:n_run]:
            x = block(x)
        if stop_at_layer is not None:
            return x
        after_pool = self.cfg.final_norm_after_pool
        if self.ln_final is not None and not after_pool:
            x = self.ln_final(x)
        pooled = a.pool(x)
        if self.ln_final is not None and after_pool:
            pooled = self.ln_final(pooled)
        return self.hook_out(a.head(self.hook_pooled(pooled)))

    def _embed(self, pixels: Pixels, image_sizes: ImageSizes, check_finite: bool | None) -> tuple[Tensor, Tensor]:
        """The adapter's embeddings; records :attr:`token_mask` and :attr:`grid_sizes` for this forward."""
        a, p = self.adapter, self.cfg.patch_size
        if not self.cfg.naflex:
            pixels = self.check_input(stack_same_size(pixels, image_sizes), check_finite)
            tok, pos = a.embed(pixels)
            self.grid_sizes = [(pixels.shape[-2] // p, pixels.shape[-1] // p)] * pixels.shape[0]
            self.token_mask = torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)
            return tok, pos
        if isinstance(pixels, Tensor):  # one check of the whole batch, then each image cut to its size
            images = image_list(self.check_input(pixels, check_finite), image_sizes)
        else:
            images = [self.check_input(img[None], check_finite)[0] for img in image_list(pixels)]
        batch = patchify(images, p)
        tok, pos = a.embed(batch)
        self.grid_sizes, self.token_mask = batch.grid_sizes, batch.token_mask(self.cfg.n_prefix_tokens)
        return tok, pos

    # ------------------------------------------------------------------ hooks and caching
    def check_hook_name(self, name: str) -> None:
        """Raise ``ValueError`` naming the closest valid hooks if ``name`` is not a hook point."""
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown hook name {name!r}.{hint} This model has {len(self.hook_dict)} hook points; "
                "list them with `sae-vision hooks MODEL` or `model.hook_dict`."
            )

    def _check_names_filter(self, names_filter: NamesFilter) -> None:
        """Every named hook exists; a list or callable that selects no hook at all is refused (the cache
        would be empty)."""
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, Sequence):
            if len(names_filter) == 0:
                raise ValueError("names_filter is empty: nothing would be cached. Pass None to cache every hook.")
            for name in names_filter:
                self.check_hook_name(name)
        elif callable(names_filter) and not any(names_filter(name) for name in self.hook_dict):
            example = next(iter(self.hook_dict))
            raise ValueError(
                f"names_filter matches none of this model's {len(self.hook_dict)} hook points (e.g. {example!r}): "
                "the cache would be empty. Check the filter against model.hook_dict."
            )

    def add_hook(self, name: str | Callable[[str], bool], hook: Callable, *args: Any, **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook(self, name: str | Callable[[str], bool], hook: Callable, dir: str) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super()._enable_hook(name=name, hook=hook, dir=dir)

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        return_cache_object: bool = True,
        pos_slice: PosSlice = None,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, VisionActivationCache | dict[str, Tensor]]:
        """Forward and cache activations, as TransformerLens's ``run_with_cache``.

        Returns ``(output, VisionActivationCache)`` (TransformerLens's ``ActivationCache``; a missing key's
        ``KeyError`` names the close keys) (a plain dict with ``return_cache_object=False``).
        ``pos_slice`` (int, slice or index list) keeps those token positions in every cached
        activation that has a position dimension (not ``hook_pooled``/``hook_out``).
        ``stop_at_layer`` and ``incl_bwd`` pass through.
        """
        self._check_names_filter(names_filter)
        if isinstance(names_filter, Sequence) and not isinstance(names_filter, str):
            names_filter = list(names_filter)
        out, cache = super().run_with_cache(
            *model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if pos_slice is not None:
            cache = {k: self._slice_positions(k, v, pos_slice) for k, v in cache.items()}
        if return_cache_object:
            cache_object = VisionActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
            cache_object.token_mask, cache_object.grid_sizes = self.token_mask, list(self.grid_sizes)
            return out, cache_object
        return out, cache

    def _slice_positions(self, name: str, t: Tensor, pos_slice: PosSlice) -> Tensor:
        base = name.removesuffix("_grad")
        if base in self._no_pos_hooks:
            return t
        # [.., pos, head, d_head] for q/k/v/z; the query position for patterns, as TransformerLens
        dim = -3 if base.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_rot_q", "hook_rot_k")) else -2
        n_pos = t.shape[dim]
        if isinstance(pos_slice, slice):
            index = torch.arange(n_pos, device=t.device)[pos_slice]
        else:
            index = torch.as_tensor([pos_slice] if isinstance(pos_slice, int) else pos_slice, device=t.device)
            if index.is_floating_point() or index.dtype == torch.bool or index.ndim != 1:
                raise ValueError(f"pos_slice must be an int, a slice or a list of int positions; got {pos_slice!r}.")
            if len(index) and not (-n_pos <= int(index.min()) and int(index.max()) < n_pos):
                raise ValueError(
                    f"pos_slice={pos_slice!r} is out of range for {n_pos} token positions of {name!r} "
                    f"(valid -{n_pos}..{n_pos - 1}; {self.cfg.n_prefix_tokens} prefix tokens, then patches row-major)."
                )
            index = index % n_pos
        return t.index_select(t.ndim + dim, index)

    def hook_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every hook name with the shape of its activation for a ``batch_size`` batch of zeros."""
        p = next(self.wrapped.parameters())
        x = torch.zeros(batch_size, self.cfg.in_chans, *self.cfg.image_size, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            _, cache = self.run_with_cache(x, return_cache_object=False)
            # scores and pattern are only materialised when hooked; run_with_cache hooks all
        return {k: tuple(v.shape) for k, v in cache.items()}

    # ------------------------------------------------------------------ preprocessing
    @property
    def data_config(self) -> dict[str, Any]:
        """``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` from the family's own config;
        ``input_size`` is the size this model was built for (``cfg.image_size``: a timm model created with
        ``img_size=96`` takes 96 px, whatever its pretrained config says)."""
        cfg = dict(self.adapter.data_config())
        if not self.cfg.dynamic_img_size:
            cfg["input_size"] = (self.cfg.in_chans, *self.cfg.image_size)
        return cfg

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """This model's preprocessing (:class:`~..data.transforms.Preprocess`): a PIL image, numpy array or
        ``[0, 1]``/uint8 tensor -> normalised ``[chan, h, w]``; a list of images or a batch -> ``[n, chan, h, w]``
        (checks and conversions in docs/hooked_vit.md, "Input checks")."""
        from ..data.transforms import transform_from_data_config

        return transform_from_data_config(self.data_config)
