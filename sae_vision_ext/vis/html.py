"""The HTML side of the visualisers: one Jinja environment over ``vis/templates`` (autoescaped).

The dashboard (``vis/dashboard.py``) and the graph viewer (``circuits/viewer.py``) render with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2


def template_env() -> jinja2.Environment:
    """A ``jinja2.Environment`` loading this package's templates, HTML autoescaped."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("sae_vision_ext.vis", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
