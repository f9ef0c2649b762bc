"""Defaults shared by the attribution API and the CLI (no imports: the CLI reads them without torch)."""

DEFAULT_MAX_FEATURE_NODES = 7500
"""circuit-tracer's default budget of feature rows (``rrm.attribute``, ``sae-vision trace``)."""
