"""The README's quickstart runs as written (its first Python block)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_quickstart_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["cache"]["blocks.3.hook_resid_post"].shape == (16, 65, 128)
    assert namespace["resid"].shape == (16, 65, 128)
    assert not torch.allclose(namespace["ablated"], namespace["logits"])
