"""``evaluate_transcoders``: how well transcoders (or a cross-layer transcoder) replace a model's MLPs.

Definitions, over every token of the given images (the same as :func:`~.evaluate.evaluate_sae`'s):

- per layer, ``fvu`` of ``blocks.{l}.hook_mlp_out`` = Σ|y − ŷ|² / Σ|y − mean(y)|² with ``ŷ`` the
  transcoder's output on the clean input (open loop); ``l0`` its active features per token; ``fvu``
  at the top level is the mean over layers and ``fvu_pooled`` the ratio of sums;
- downstream, three runs: clean, *replaced* (every covered MLP output replaced by its transcoder's
  output on the live input: no error term, errors compound through the layers as in a replacement
  model) and *ablated* (those MLP outputs replaced by their per-position mean). Classifiers: mean
  KL(clean || run), top-1 agreement with clean, accuracy with labels and ``loss_recovered`` =
  (L_ablated − L_replaced) / (L_ablated − L_clean) with L the cross-entropy to the labels (to the
  clean prediction without labels); embeddings: cosine with clean and the same ratio of cosines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT
    from .clt import CrossLayerTranscoder


class _Replacement:
    """Forward hooks that record each covered layer's input and replace its MLP output."""

    def __init__(self, transcoders: list[SAE] | CrossLayerTranscoder) -> None:
        from .clt import CrossLayerTranscoder

        self.clt = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
        if self.clt is not None:
            n = self.clt.cfg.n_layers
            self.pairs = [(self.clt.hook_in_name(j), self.clt.hook_out_name(j)) for j in range(n)]
        else:
            self.pairs = [(t.cfg.metadata.hook_name, _hook_out(t)) for t in transcoders]  # type: ignore[union-attr]
            self.by_out = {out: t for (_, out), t in zip(self.pairs, transcoders, strict=True)}  # type: ignore[arg-type]
        self.inputs: dict[str, Tensor] = {}
        self.acts: list[Tensor] = []

    def output(self, layer_out: str) -> Tensor:
        j = [o for _, o in self.pairs].index(layer_out)
        x = self.inputs[self.pairs[j][0]]
        if self.clt is None:
            return self.by_out[layer_out](x)
        return self.clt.decode_layer(self.acts[: j + 1], j, x)

    def hooks(self) -> list[tuple[str, Any]]:
        def record(act: Tensor, hook: Any) -> None:
            self.inputs[hook.name] = act
            if self.clt is not None:
                j = [i for i, _ in self.pairs].index(hook.name)
                self.acts[j:] = [self.clt.encode_layer(act, j)]

        def replace(act: Tensor, hook: Any) -> Tensor:
            return self.output(hook.name).to(act.dtype)

        return [h for i, o in self.pairs for h in ((i, record), (o, replace))]


def _hook_out(sae: SAE) -> str:
    out = sae.cfg.metadata.hook_name_out
    if out is None:
        raise ValueError(
            f"{type(sae).__name__} at {sae.cfg.metadata.hook_name!r} has no cfg.metadata.hook_name_out; a transcoder "
            "must name its output hook (blocks.{l}.hook_mlp_out). Set sae.cfg.metadata.hook_name_out."
        )
    return str(out)


@torch.no_grad()
def evaluate_transcoders(
    model: HookedViT,
    transcoders: list[SAE] | CrossLayerTranscoder,
    pixels: Tensor,
    labels: Tensor | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Metrics (module docstring) of ``transcoders`` (SAELens transcoders, any subset of layers, or one
    CLT) replacing ``model``'s MLPs on ``pixels`` (preprocessed ``[n, chan, h, w]``)."""
    from ..data.checks import check_images

    labels = check_images("evaluate_transcoders", pixels, labels, batch_size)
    rep = _Replacement(transcoders)
    names = [h for pair in rep.pairs for h in pair]
    chunks = [slice(i, i + batch_size) for i in range(0, len(pixels), batch_size)]
    clean_out, cache = [], {h: [] for h in names}
    for s in chunks:
        out, c = model.run_with_cache(pixels[s], names_filter=lambda n: n in names, return_cache_object=False)
        clean_out.append(out)
        for h in names:
            cache[h].append(c[h])
    clean, acts = torch.cat(clean_out), {h: torch.cat(v) for h, v in cache.items()}
    sq = dict.fromkeys((o for _, o in rep.pairs), 0.0)
    for s in chunks:  # open loop: each layer's clean input through its transcoder
        rep.acts = []
        for j, (i, o) in enumerate(rep.pairs):
            rep.inputs[i] = acts[i][s]
            if rep.clt is not None:
                rep.acts.append(rep.clt.encode_layer(acts[i][s], j))
            sq[o] += float((acts[o][s] - rep.output(o)).pow(2).sum())
    layers: dict[str, dict[str, float]] = {}
    for i, o in rep.pairs:
        y = acts[o].flatten(0, -2)
        layers[o] = {"fvu": sq[o] / float((y - y.mean(0)).pow(2).sum()), "l0": _l0(rep, i, acts[i])}
    total = sum(float((acts[o].flatten(0, -2) - acts[o].flatten(0, -2).mean(0)).pow(2).sum()) for _, o in rep.pairs)
    metrics: dict[str, Any] = {
        "n_images": len(pixels), "layers": layers,
        "fvu": sum(v["fvu"] for v in layers.values()) / len(layers), "fvu_pooled": sum(sq.values()) / total,
        "l0": sum(v["l0"] for v in layers.values()) / len(layers),
    }  # fmt: skip
    replaced = torch.cat([model.run_with_hooks(pixels[s], fwd_hooks=rep.hooks()) for s in chunks])
    means = {o: acts[o].mean(0, keepdim=True) for _, o in rep.pairs}
    ablate = [(o, lambda a, hook: means[hook.name].expand_as(a)) for _, o in rep.pairs]
    ablated = torch.cat([model.run_with_hooks(pixels[s], fwd_hooks=ablate) for s in chunks])
    metrics |= _downstream(model, clean, replaced, ablated, labels)
    return metrics


def _l0(rep: _Replacement, hook_in: str, x: Tensor) -> float:
    if rep.clt is not None:
        j = [i for i, _ in rep.pairs].index(hook_in)
        return float((rep.clt.encode_layer(x, j) != 0).sum(-1).float().mean())
    sae = rep.by_out[dict(rep.pairs)[hook_in]]
    return float((sae.encode(x) != 0).sum(-1).float().mean())


def _downstream(model: HookedViT, clean: Tensor, replaced: Tensor, ablated: Tensor, labels: Tensor | None) -> dict:
    if model.adapter.output_kind() != "logits":
        cos = {k: float(F.cosine_similarity(v.flatten(1), clean.flatten(1)).mean()) for k, v in
               (("replaced", replaced), ("ablated", ablated))}  # fmt: skip
        rec = (cos["replaced"] - cos["ablated"]) / (1 - cos["ablated"]) if cos["ablated"] < 1 else None
        return {"cosine": cos, "loss_recovered": rec}
    logp = {k: F.log_softmax(v, -1) for k, v in (("clean", clean), ("replaced", replaced), ("ablated", ablated))}
    target = labels if labels is not None else clean.argmax(-1)
    ce = {k: float(F.nll_loss(v, target)) for k, v in logp.items()}
    out: dict[str, Any] = {"ce_loss": ce}
    for run in ("replaced", "ablated"):
        out[f"kl_{run}"] = float(F.kl_div(logp[run], logp["clean"], log_target=True, reduction="batchmean"))
        out[f"top1_agreement_{run}"] = float((logp[run].argmax(-1) == clean.argmax(-1)).float().mean())
    denom = ce["ablated"] - ce["clean"]
    out["loss_recovered"] = float((ce["ablated"] - ce["replaced"]) / denom) if abs(denom) > 1e-12 else None
    if labels is not None:
        out["accuracy"] = {k: float((v.argmax(-1) == labels).float().mean()) for k, v in logp.items()}
    return out
