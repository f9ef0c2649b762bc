"""The package's SAELens classes register whichever module imports SAELens first: a fresh process per
first import (a registrar whose own import loads SAELens used to fail with a circular import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

FIRST_IMPORTS = [
    "sae_lens",
    "sae_vision_ext",
    "sae_vision_ext.saes.signed_topk",
    "sae_vision_ext.saes.transcoders",
    "sae_vision_ext.saes.clt",
    "sae_vision_ext.training.transcoders",
    "sae_vision_ext.training.clt_training",
    "sae_vision_ext.training.auxk",
]

CHECK = """
import {first}
import sae_vision_ext, sae_lens
from sae_lens.registry import SAE_CLASS_REGISTRY
missing = [k for k in ("signed_topk", "topk_transcoder", "topk_skip_transcoder") if k not in SAE_CLASS_REGISTRY]
print("missing", missing)
"""


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_inference_classes_register_in_any_import_order(first):
    out = subprocess.run([sys.executable, "-c", CHECK.format(first=first)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "missing []"
