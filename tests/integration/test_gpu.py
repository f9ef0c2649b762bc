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
    from helpers import check_exact, images, rrm_with

    rrm = rrm_with("timm_cls", arch, norm, True)
    rrm.model.cuda()
    for sae in rrm.saes:
        sae.to("cuda")
    assert check_exact(rrm, images(1).double().cuda(), n_sources=1) > 5


def test_closed_form_rows_equal_autograd_rows_on_cuda_and_stay_there():
    """The staged row engine on CUDA: equal to the autograd rows (float64) and to the same graph on the
    CPU; the graph comes back on the CPU (one transfer at the end)."""
    from helpers import images, rrm_with

    from sae_vision_ext.circuits.engine.attribution import Attributor

    rrm = rrm_with("timm_cls", "topk_rescale", "layer_norm", True)
    x = images(1).double()
    cpu = Attributor(rrm, batch_size=5).attribute(x, max_feature_nodes=12)
    rrm.model.cuda()
    for sae in rrm.saes:
        sae.to("cuda")
    staged = Attributor(rrm, batch_size=5).attribute(x.cuda(), max_feature_nodes=12)
    plain = Attributor(rrm, batch_size=5, engine="autograd").attribute(x.cuda(), max_feature_nodes=12)
    assert staged.adjacency.device.type == "cpu"
    torch.testing.assert_close(staged.dense(), plain.dense(), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(staged.dense(), cpu.dense(), atol=1e-10, rtol=1e-8)
