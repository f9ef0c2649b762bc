"""``ResidualReplacementModel`` and ``TranscoderReplacementModel``: the replacement kinds with their
attribution methods.

Everything about the model itself (SAE layers, splicing, the frozen state, references,
interventions) lives in :class:`~.replacement.base.ReplacementModelBase`, which the attribution,
aggregation and evaluation modules build on; this subclass adds ``attribute`` and
``attribute_aggregated`` on top of them, so dependencies run one way (base -> engines -> this).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from .engine.aggregated import attribute_aggregated
from .engine.attribution import Attributor
from .engine.defaults import DEFAULT_MAX_FEATURE_NODES
from .engine.transcoder_attribution import TranscoderAttributor
from .graph.graph import AggregatedGraph, AttributionGraph
from .replacement.base import Reference, ReplacementModelBase
from .replacement.transcoder import TranscoderReplacementBase

__all__ = ["Reference", "ResidualReplacementModel", "TranscoderReplacementModel"]


class ResidualReplacementModel(ReplacementModelBase):
    """A ViT with one SAE on the residual stream of each chosen block (see ``ReplacementModelBase``)."""

    def attribute(
        self,
        pixels: Tensor,
        target: Tensor | int | None = None,
        batch_size: int = 64,
        max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
        mlp_leaves: bool = False,
        *,
        progress: bool = False,
    ) -> AttributionGraph:
        """Attribution graph of one image (see ``circuits/engine/attribution.py``); ``target``: ``None`` for the
        predicted class, a class id, or output direction(s). ``max_feature_nodes``: budget of feature
        rows, explored in order of influence (default 7,500, circuit-tracer's; ``None``: all).
        ``mlp_leaves``: MLP outputs as leaf nodes. ``progress``: a progress bar over rows."""
        attributor = Attributor(self, batch_size, mlp_leaves)
        return attributor.attribute(pixels, target, max_feature_nodes=max_feature_nodes, progress=progress)

    def attribute_aggregated(
        self,
        pixels: Tensor,
        reference: list[Tensor] | None = None,
        error_reference: list[Tensor] | None = None,
        target: int | None = None,
        leaf_errors: bool = True,
        *,
        batch_size: int = 64,
        engine: str = "staged",
    ) -> AggregatedGraph:
        """The seed paper's token-aggregated graph of one image (``circuits/engine/aggregated.py``): per SAE
        layer a relevance per feature plus one error node, dense edges between consecutive SAE layers.
        ``reference``: ``self.reference_values(ref_pixels, kind="median")`` (default zero)."""
        return attribute_aggregated(
            self,
            pixels,
            reference,
            error_reference,
            target,
            leaf_errors=leaf_errors,
            batch_size=batch_size,
            engine=engine,
        )


class TranscoderReplacementModel(TranscoderReplacementBase):
    """A ViT whose MLPs are replaced by transcoders: SAELens transcoders (any subset of blocks, one per
    block) or one cross-layer transcoder (``replacement/transcoder.py``). Graphs have layer-skipping
    edges through frozen attention (``engine/transcoder_attribution.py``)."""

    def attribute(
        self,
        pixels: Tensor,
        target: Tensor | int | None = None,
        batch_size: int = 32,
        max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
        *,
        engine: Literal["closed", "autograd"] = "closed",
        progress: bool = False,
    ) -> AttributionGraph:
        """Attribution graph of one image; ``target``: ``None`` for the predicted class, a class id, or output
        direction(s). ``max_feature_nodes``: budget of feature rows, explored in order of influence (default
        7,500, circuit-tracer's; ``None``: all). ``engine="autograd"``: batched VJPs for every row (the reference)."""
        attributor = TranscoderAttributor(self, batch_size, engine)
        return attributor.attribute(pixels, target, max_feature_nodes=max_feature_nodes, progress=progress)
