"""sae_vision_ext: SAELens and TransformerLens workflows for vision transformers.

``import sae_vision_ext as sve`` is cheap: torch, TransformerLens and the model libraries load on
first use of a name below (PEP 562 lazy attributes), never at import time. The one thing importing
does is arrange for this package's SAELens class (``signed_topk``) to be registered with SAELens
when SAELens is loaded (``_sae_lens_hook``), so plain ``SAE.load_from_disk`` reads such folders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _sae_lens_hook
from ._version import __version__

_sae_lens_hook.install()

_LAZY: dict[str, str] = {
    "HookedViT": "sae_vision_ext.models",
    "HookedViTConfig": "sae_vision_ext.models",
    "ViTAdapter": "sae_vision_ext.models",
    "list_adapters": "sae_vision_ext.models",
    "list_embedded_models": "sae_vision_ext.models",
    "register_adapter": "sae_vision_ext.models",
    "register_loader": "sae_vision_ext.models",
    "make_shapes": "sae_vision_ext.data.shapes",
    "SHAPES": "sae_vision_ext.data.shapes",
    "VisionSAETrainingConfig": "sae_vision_ext.training.config",
    "train_saes": "sae_vision_ext.training.train",
    "TrainingInterrupted": "sae_vision_ext._errors",
    "load_sae": "sae_vision_ext.saes.loading",
    "evaluate_sae": "sae_vision_ext.saes.evaluate",
    "evaluate_transcoders": "sae_vision_ext.saes.evaluate_transcoders",
    "CrossLayerTranscoder": "sae_vision_ext.saes.clt",
    "benchmark_sae": "sae_vision_ext.saes.benchmark",
    "collect_feature_stats": "sae_vision_ext.vis.stats",
    "FeatureStats": "sae_vision_ext.vis.stats",
    "plot_top_patches": "sae_vision_ext.vis.plots",
    "build_dashboard": "sae_vision_ext.vis.dashboard",
    "analyse_features": "sae_vision_ext.vis.analysis",
    "Attribute": "sae_vision_ext.vis.analysis",
    "FeatureAnalysis": "sae_vision_ext.vis.analysis",
    "shapes_attributes": "sae_vision_ext.vis.analysis",
    "ResidualReplacementModel": "sae_vision_ext.circuits.models",
    "TranscoderReplacementModel": "sae_vision_ext.circuits.models",
    "TranscoderRecord": "sae_vision_ext.circuits.replacement.transcoder",
    "render_graph_html": "sae_vision_ext.circuits.graph.viewer",
    "write_circuit_tracer": "sae_vision_ext.circuits.graph.export",
    "logit_lens": "sae_vision_ext.circuits.evaluate.logit_lens",
    "AttributionGraph": "sae_vision_ext.circuits.graph.graph",
    "evaluate_circuit": "sae_vision_ext.circuits.evaluate.circuit",
    "CircuitEvaluation": "sae_vision_ext.circuits.evaluate.curves",
    "SpuriousFeatures": "sae_vision_ext.circuits.evaluate.debias",
    "find_spurious_features": "sae_vision_ext.circuits.evaluate.debias",
    "debias": "sae_vision_ext.circuits.evaluate.debias",
    "AggregatedGraph": "sae_vision_ext.circuits.engine.aggregated",
    "attribute_aggregated": "sae_vision_ext.circuits.engine.aggregated",
    "FrozenNorm": "sae_vision_ext.saes.affine",
    "HeadLoadings": "sae_vision_ext.circuits.engine.attention",
    "QKAttribution": "sae_vision_ext.circuits.engine.attention",
    "head_loadings": "sae_vision_ext.circuits.engine.attention",
    "qk_attribution": "sae_vision_ext.circuits.engine.attention",
    "Supernode": "sae_vision_ext.circuits.graph.supernodes",
    "group_nodes": "sae_vision_ext.circuits.graph.supernodes",
    "supernode_graph": "sae_vision_ext.circuits.graph.supernodes",
}

if TYPE_CHECKING:
    from ._errors import TrainingInterrupted
    from .circuits.engine.aggregated import AggregatedGraph, attribute_aggregated
    from .circuits.engine.attention import HeadLoadings, QKAttribution, head_loadings, qk_attribution
    from .circuits.evaluate.circuit import evaluate_circuit
    from .circuits.evaluate.curves import CircuitEvaluation
    from .circuits.evaluate.debias import SpuriousFeatures, debias, find_spurious_features
    from .circuits.evaluate.logit_lens import logit_lens
    from .circuits.graph.export import write_circuit_tracer
    from .circuits.graph.graph import AttributionGraph
    from .circuits.graph.supernodes import Supernode, group_nodes, supernode_graph
    from .circuits.graph.viewer import render_graph_html
    from .circuits.models import ResidualReplacementModel, TranscoderReplacementModel
    from .circuits.replacement.transcoder import TranscoderRecord
    from .data.shapes import SHAPES, make_shapes
    from .models import (
        HookedViT,
        HookedViTConfig,
        ViTAdapter,
        list_adapters,
        list_embedded_models,
        register_adapter,
        register_loader,
    )
    from .saes.affine import FrozenNorm
    from .saes.benchmark import benchmark_sae
    from .saes.clt import CrossLayerTranscoder
    from .saes.evaluate import evaluate_sae
    from .saes.evaluate_transcoders import evaluate_transcoders
    from .saes.loading import load_sae
    from .training.config import VisionSAETrainingConfig
    from .training.train import train_saes
    from .vis.analysis import Attribute, FeatureAnalysis, analyse_features, shapes_attributes
    from .vis.dashboard import build_dashboard
    from .vis.plots import plot_top_patches
    from .vis.stats import FeatureStats, collect_feature_stats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sae_vision_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "SHAPES",
    "AggregatedGraph",
    "Attribute",
    "AttributionGraph",
    "CircuitEvaluation",
    "CrossLayerTranscoder",
    "FeatureAnalysis",
    "FeatureStats",
    "FrozenNorm",
    "HeadLoadings",
    "HookedViT",
    "HookedViTConfig",
    "QKAttribution",
    "ResidualReplacementModel",
    "SpuriousFeatures",
    "Supernode",
    "TrainingInterrupted",
    "TranscoderRecord",
    "TranscoderReplacementModel",
    "ViTAdapter",
    "VisionSAETrainingConfig",
    "__version__",
    "analyse_features",
    "attribute_aggregated",
    "benchmark_sae",
    "build_dashboard",
    "collect_feature_stats",
    "debias",
    "evaluate_circuit",
    "evaluate_sae",
    "evaluate_transcoders",
    "find_spurious_features",
    "group_nodes",
    "head_loadings",
    "list_adapters",
    "list_embedded_models",
    "load_sae",
    "logit_lens",
    "make_shapes",
    "plot_top_patches",
    "qk_attribution",
    "register_adapter",
    "register_loader",
    "render_graph_html",
    "shapes_attributes",
    "supernode_graph",
    "train_saes",
    "write_circuit_tracer",
]
