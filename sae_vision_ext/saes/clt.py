"""Cross-layer transcoders (CLTs) in circuit-tracer 0.5.0's parameters and files.

A CLT spans every block of a model: layer ``l``'s features read that block's MLP input
(``blocks.{l}.hook_resid_mid`` or ``blocks.{l}.ln2.hook_normalized``) and write to the MLP output
(``blocks.{j}.hook_mlp_out``) of every block ``j >= l``::

    a_l   = act(x_l @ W_enc[l].T + b_enc[l])                          [..., d_sae]
    ŷ_j   = Σ_{i<=j} a_i @ W_dec[i][:, j - i] + b_dec[j]  (+ x_j @ W_skip[j])

Parameters are named and shaped as circuit-tracer's ``CrossLayerTranscoder`` (state dicts interchange,
:meth:`CrossLayerTranscoder.circuit_tracer_state_dict`): ``W_enc [n_layers, d_sae, d_in]``,
``b_enc [n_layers, d_sae]``, ``b_dec [n_layers, d_out]``, ``W_dec[i] [d_sae, n_layers - i, d_out]``,
``threshold [n_layers, d_sae]`` (jumprelu; circuit-tracer's ``activation_function.threshold`` is
``[n_layers, 1, d_sae]``) and ``W_skip [n_layers, d_in, d_out]`` applied as circuit-tracer's CLT does,
``x @ W_skip[j]`` (its single-layer transcoder and SAELens use ``x @ W_skip.T``; use :meth:`skip_layer`).

Files (:func:`save_clt`, :func:`load_clt`): circuit-tracer's layout, ``W_enc_{i}.safetensors``
(``W_enc_{i}``, ``b_enc_{i}``, ``b_dec_{i}``, ``threshold_{i}``) and ``W_dec_{i}.safetensors``
(``W_dec_{i}``), plus ``W_skip_{i}.safetensors`` for skip CLTs (circuit-tracer 0.5.0 neither writes nor
reads a CLT's skip) and ``clt_config.json`` (:class:`CLTConfig`). circuit-tracer's ``load_clt`` reads
such a folder; a ``topk`` CLT loads there as ``relu`` (it has no TopK), so its outputs differ there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .._config import ConfigMixin

CLTActivation = Literal["relu", "jumprelu", "topk"]
CLTHookIn = Literal["hook_resid_mid", "ln2.hook_normalized"]
CLTHookOut = Literal["hook_mlp_out"]
CONFIG_FILE = "clt_config.json"
FORMAT_NAME = "circuit_tracer_clt"


@dataclass
class CLTConfig(ConfigMixin):
    """The shape and behaviour of a :class:`CrossLayerTranscoder` (written as ``clt_config.json``)."""

    d_in: int
    """Width of each layer's input (the model's ``d_model``)."""
    d_sae: int
    """Features per layer (circuit-tracer's ``d_transcoder``)."""
    n_layers: int
    """Blocks of the model; a CLT always spans all of them."""
    activation: CLTActivation = "relu"
    """``relu``, ``jumprelu`` (a learned threshold per feature) or ``topk`` (the ``k`` largest per layer)."""
    k: int | None = None
    """Active features per token and layer for ``topk`` (required there, unused otherwise)."""
    hook_in: CLTHookIn = "ln2.hook_normalized"
    """What layer ``l``'s encoder reads: ``blocks.{l}.<hook_in>``."""
    hook_out: CLTHookOut = "hook_mlp_out"
    """What the decoders write: ``blocks.{j}.<hook_out>``."""
    skip_connection: bool = False
    """A linear skip ``x_j @ W_skip[j]`` per layer (https://arxiv.org/abs/2501.18823)."""
    d_out: int | None = None
    """Width of each output (``None``: ``d_in``)."""
    model_name: str | None = None
    """Model id the CLT was trained on (``HookedViT.from_pretrained``)."""
    dtype: str = "float32"
    """Parameter dtype (a torch dtype name)."""
    device: str = "cpu"
    """Parameter device."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLTConfig.{name} must be a positive integer, got {value!r}.")
        for name, valid in (
            ("activation", get_args(CLTActivation)),
            ("hook_in", get_args(CLTHookIn)),
            ("hook_out", get_args(CLTHookOut)),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"CLTConfig.{name}={getattr(self, name)!r} is not valid; choose one of {list(valid)}.")
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ValueError(
                f"CLTConfig: activation 'topk' needs 0 < k <= d_sae={self.d_sae}, got k={self.k!r}; set k."
            )
        if self.d_out is not None and self.d_out <= 0:
            raise ValueError(f"CLTConfig.d_out must be positive or None, got {self.d_out!r}.")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"CLTConfig.dtype={self.dtype!r} is not a torch dtype name (float32, float64, ...).")

    @property
    def d_output(self) -> int:
        return self.d_in if self.d_out is None else self.d_out


class CrossLayerTranscoder(nn.Module):
    """A CLT (module docstring): one encoder per layer, decoders to that layer and every later one."""

    threshold: nn.Parameter | None
    W_skip: nn.Parameter | None

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, f, d, o = cfg.n_layers, cfg.d_sae, cfg.d_in, cfg.d_output
        kw = {"dtype": getattr(torch, cfg.dtype), "device": cfg.device}
        self.W_enc = nn.Parameter(torch.zeros(n, f, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, f, **kw))
        self.b_dec = nn.Parameter(torch.zeros(n, o, **kw))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(f, n - i, o, **kw)) for i in range(n)])
        self.threshold = nn.Parameter(torch.zeros(n, f, **kw)) if cfg.activation == "jumprelu" else None
        self.W_skip = nn.Parameter(torch.zeros(n, d, o, **kw)) if cfg.skip_connection else None

    def hook_in_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.cfg.hook_in}"

    def hook_out_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.cfg.hook_out}"

    def pre_acts_layer(self, x: Float[Tensor, "*batch d_in"], layer: int) -> Float[Tensor, "*batch d_sae"]:
        """Layer ``layer``'s pre-activations ``x @ W_enc[layer].T + b_enc[layer]``."""
        return x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]

    def activate(self, pre: Float[Tensor, "*batch d_sae"], layer: int) -> Float[Tensor, "*batch d_sae"]:
        """The activation of layer ``layer``'s features from their pre-activations."""
        if self.cfg.activation == "relu":
            return pre.relu()
        if self.cfg.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold[layer])
        values, indices = pre.topk(int(self.cfg.k or 0), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode_layer(self, x: Float[Tensor, "*batch d_in"], layer: int) -> Float[Tensor, "*batch d_sae"]:
        return self.activate(self.pre_acts_layer(x, layer), layer)

    def skip_layer(self, x: Float[Tensor, "*batch d_in"], layer: int) -> Float[Tensor, "*batch d_out"]:
        """Layer ``layer``'s skip term ``x @ W_skip[layer]`` (circuit-tracer's ``compute_skip``)."""
        if self.W_skip is None:
            raise ValueError("This CLT has no skip connection (cfg.skip_connection is False).")
        return x.to(self.W_skip.dtype) @ self.W_skip[layer]

    def decode_layer(
        self,
        acts: list[Float[Tensor, "*batch d_sae"]],
        layer: int,
        x: Float[Tensor, "*batch d_in"] | None = None,
    ) -> Float[Tensor, "*batch d_out"]:
        """Output ``layer`` from the activations of layers ``0..layer`` (``acts[i]``, more are ignored);
        ``x`` is this layer's input, needed for the skip term of a skip CLT."""
        if len(acts) <= layer:
            raise ValueError(f"decode_layer({layer}) needs the activations of layers 0..{layer}, got {len(acts)}.")
        out = self.b_dec[layer] + sum(acts[i] @ self.W_dec[i][:, layer - i] for i in range(layer + 1))
        if self.W_skip is not None:
            if x is None:
                raise ValueError("This CLT has a skip connection: pass the layer's input x to decode_layer.")
            out = out + self.skip_layer(x, layer)
        return out

    def encode(self, inputs: Float[Tensor, "n_layers *batch d_in"]) -> Float[Tensor, "n_layers *batch d_sae"]:
        self._check_layers(inputs)
        return torch.stack([self.encode_layer(inputs[layer], layer) for layer in range(self.cfg.n_layers)])

    def decode(
        self,
        acts: Float[Tensor, "n_layers *batch d_sae"],
        inputs: Float[Tensor, "n_layers *batch d_in"] | None = None,
    ) -> Float[Tensor, "n_layers *batch d_out"]:
        self._check_layers(acts)
        layers = list(acts.unbind(0))
        xs = [None] * self.cfg.n_layers if inputs is None else list(inputs.unbind(0))
        return torch.stack([self.decode_layer(layers, j, xs[j]) for j in range(self.cfg.n_layers)])

    def forward(self, inputs: Float[Tensor, "n_layers *batch d_in"]) -> Float[Tensor, "n_layers *batch d_out"]:
        return self.decode(self.encode(inputs), inputs)

    def _check_layers(self, t: Tensor) -> None:
        if t.shape[0] != self.cfg.n_layers:
            raise ValueError(
                f"Expected a leading dimension of n_layers={self.cfg.n_layers}, got shape {tuple(t.shape)}."
            )

    def circuit_tracer_state_dict(self) -> dict[str, Tensor]:
        """This CLT's tensors under circuit-tracer's ``CrossLayerTranscoder`` names and shapes
        (``load_state_dict`` into one built with the same activation and skip)."""
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
        state |= {f"W_dec.{i}": w for i, w in enumerate(self.W_dec)}
        if self.threshold is not None:
            state["activation_function.threshold"] = self.threshold[:, None, :]
        if self.W_skip is not None:
            state["W_skip"] = self.W_skip
        return {k: v.detach() for k, v in state.items()}


def save_clt(clt: CrossLayerTranscoder, path: str | Path) -> Path:
    """Write ``clt`` in circuit-tracer's layout (module docstring) under the folder ``path``."""
    from safetensors.torch import save_file

    from .._io import atomic_write_text

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clt.cfg.n_layers):
        enc = {f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if clt.threshold is not None:
            enc[f"threshold_{i}"] = clt.threshold[i]
        save_file(_cpu(enc), folder / f"W_enc_{i}.safetensors")
        save_file(_cpu({f"W_dec_{i}": clt.W_dec[i]}), folder / f"W_dec_{i}.safetensors")
        if clt.W_skip is not None:
            save_file(_cpu({f"W_skip_{i}": clt.W_skip[i]}), folder / f"W_skip_{i}.safetensors")
    atomic_write_text(folder / CONFIG_FILE, json.dumps({"format": FORMAT_NAME, **clt.cfg.to_dict()}, indent=2))
    return folder


def is_clt_folder(path: Path) -> bool:
    """A folder in circuit-tracer's CLT layout (``W_enc_0`` and ``W_dec_0`` safetensors)."""
    return path.is_dir() and (path / "W_enc_0.safetensors").is_file() and (path / "W_dec_0.safetensors").is_file()


def load_clt(
    path: str | Path, device: str = "cpu", dtype: str | None = None, **cfg_overrides: Any
) -> CrossLayerTranscoder:
    """Read a CLT folder written by :func:`save_clt` or by circuit-tracer's ``to_safetensors`` (then the
    config is inferred from the tensors: ``jumprelu`` when thresholds are present, else ``relu``;
    ``hook_in`` defaults to circuit-tracer's ``hook_resid_mid``). ``cfg_overrides`` set any
    :class:`CLTConfig` field (``hook_in``, ``model_name``, ...)."""
    from safetensors import safe_open

    folder = Path(path)
    if not is_clt_folder(folder):
        raise ValueError(f"{folder} is not a CLT folder: it needs W_enc_0.safetensors and W_dec_0.safetensors.")
    n_layers = sum(1 for _ in folder.glob("W_enc_*.safetensors"))
    tensors: dict[str, Tensor] = {}
    for i in range(n_layers):
        for stem in ("W_enc", "W_dec", "W_skip"):
            file = folder / f"{stem}_{i}.safetensors"
            if stem == "W_skip" and not file.is_file():
                continue
            try:
                with safe_open(str(file), framework="pt") as f:
                    tensors |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            except Exception as e:
                raise ValueError(f"{file} is missing, truncated or corrupt ({type(e).__name__}: {e}).") from e
    cfg_file = folder / CONFIG_FILE
    stored = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    stored.pop("format", None)
    d_sae, d_in = tensors["W_enc_0"].shape
    inferred = {
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "n_layers": n_layers,
        "activation": "jumprelu" if "threshold_0" in tensors else "relu",
        "hook_in": "hook_resid_mid",
        "skip_connection": "W_skip_0" in tensors,
        "d_out": int(tensors["b_dec_0"].shape[0]),
    }
    cfg = CLTConfig.from_dict({**inferred, **stored, **cfg_overrides, "device": device} | _dtype(stored, dtype))
    clt = CrossLayerTranscoder(cfg)
    state = {
        "W_enc": torch.stack([tensors[f"W_enc_{i}"] for i in range(n_layers)]),
        "b_enc": torch.stack([tensors[f"b_enc_{i}"] for i in range(n_layers)]),
        "b_dec": torch.stack([tensors[f"b_dec_{i}"] for i in range(n_layers)]),
    } | {f"W_dec.{i}": tensors[f"W_dec_{i}"] for i in range(n_layers)}
    if cfg.activation == "jumprelu":
        state["threshold"] = torch.stack([tensors[f"threshold_{i}"].reshape(-1) for i in range(n_layers)])
    if cfg.skip_connection:
        state["W_skip"] = torch.stack([tensors[f"W_skip_{i}"] for i in range(n_layers)])
    try:
        clt.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the tensors do not match {cfg_file.name} ({e}).") from e
    return clt.eval()


def _dtype(stored: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    return {"dtype": dtype} if dtype is not None else ({} if "dtype" in stored else {"dtype": "float32"})


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
