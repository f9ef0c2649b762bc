"""The shipped example configs (examples/configs/*.yaml, shown in README.md) load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest

import sae_vision_ext as sve

CONFIGS = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 3, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_loads(path):
    cfg = sve.VisionSAETrainingConfig.from_file(path)
    text = path.read_text()
    for line in text.splitlines():  # every field written in the file is the value the config holds
        if line and not line.startswith((" ", "#")) and ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            got = getattr(cfg, key)
            assert str(got).replace(" ", "") == value.replace(" ", "") or float(got) == float(value), (key, got, value)
