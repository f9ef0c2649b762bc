"""What circuit evaluations return: node fractions, curve metrics, AUC and the result type.

Shared by ``evaluate/circuit.py`` (this package's protocol) and ``evaluate/seed_protocol.py`` (the seed paper's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
METRICS = ("logit", "demeaned_logit", "prob", "accuracy")
RANKINGS = ("influence", "random", "neurons")


@dataclass
class CircuitEvaluation:
    """Curves averaged over images: ``curves[ranking][mode][metric]`` is a list over ``fractions``."""

    fractions: list[float]
    curves: dict[str, dict[str, dict[str, list[float]]]]
    auc: dict[str, dict[str, dict[str, float]]]
    faithfulness: float
    """Mean circuit faithfulness of the pruned graphs' feature sets (see module docstring)."""
    completeness: float
    influence_ablation_spearman: float
    """Mean over images of the Spearman correlation of influence and single-node ablation effect."""
    n_images: int
    circuit_sizes: list[int] = field(default_factory=list)
    """Features kept by pruning, per image."""
    protocol: str = "ours"
    """``ours`` (position-resolved graph, module docstring) or ``seed`` (``circuits/evaluate/seed_protocol.py``)."""
    errors: str = "recomputed"
    """What unedited SAE error terms do: ``recomputed`` from the edited residual (``ours``) or held at
    the ``clean`` image's values (``seed``, as the paper's code does)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, metric: str = "demeaned_logit") -> str:
        """Markdown: AUC per ranking for insertion (higher is better) and deletion (lower is better)."""
        lines = [f"| ranking | insertion AUC ({metric}) | deletion AUC ({metric}) |", "|---|---|---|"]
        for r in self.auc:
            lines.append(f"| {r} | {self.auc[r]['insertion'][metric]:.3f} | {self.auc[r]['deletion'][metric]:.3f} |")
        return "\n".join(lines)


def output_metrics(out: Tensor, target: int) -> dict[str, Tensor]:
    """The four curve metrics of each output row for class ``target`` (float64)."""
    logits = out.double()
    return {
        "logit": logits[:, target],
        "demeaned_logit": logits[:, target] - logits.mean(-1),
        "prob": logits.softmax(-1)[:, target],
        "accuracy": (logits.argmax(-1) == target).double(),
    }


def auc(ys: Sequence[float]) -> float:
    """Area under a curve sampled at equally spaced points of [0, 1] (trapezoid rule)."""
    xs = torch.linspace(0, 1, len(ys), dtype=torch.float64)
    return float(torch.trapezoid(torch.tensor(ys, dtype=torch.float64), xs))
