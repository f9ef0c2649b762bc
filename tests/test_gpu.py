"""Exactness on CUDA: the attribution rows equal the frozen-perturbation reference on the GPU too.

Runs only where torch sees a CUDA device; on a CPU-only machine it is skipped with the reason printed
(``-ra`` lists it). The same checks run on the CPU in ``test_attribution_saes.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU TEST NOT RUN: torch sees no CUDA device here"),
]


@pytest.mark.parametrize(("arch", "norm"), [("topk", "layer_norm"), ("jumprelu", "none"), ("standard", "none")])
def test_attribution_rows_are_exact_on_cuda(arch, norm):
    from conftest import images
    from test_attribution_saes import check_exact, rrm_with

    rrm = rrm_with("timm_cls", arch, norm, True)
    rrm.model.cuda()
    for sae in rrm.saes:
        sae.to("cuda")
    assert check_exact(rrm, images(1).double().cuda(), n_sources=1) > 5
