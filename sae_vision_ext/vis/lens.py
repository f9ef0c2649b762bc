"""Reading a logit lens (``circuits/evaluate/logit_lens.py`` computes it): a feature's top and bottom classes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def top_bottom(effect: Tensor, feature: int, names: Sequence[str], k: int = 3) -> tuple[list[str], list[str]]:
    """The ``k`` classes a feature pushes up most and down most, as ``"name (+1.23)"`` strings."""
    row = effect[feature]
    k = min(k, len(row))
    top = row.topk(k).indices.tolist()
    bottom = (-row).topk(k).indices.tolist()

    def fmt(c: int) -> str:
        name = names[c] if c < len(names) else f"class {c}"
        return f"{name} ({float(row[c]):+.3g})"

    return [fmt(c) for c in top], [fmt(c) for c in bottom]
