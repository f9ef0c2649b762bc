"""Attribution through attention (``circuits/engine/attention.py``), in float64 on every adapter family:

- head loadings: the parts of an edge (direct + one per head) sum to the edge the graph's own engine computed
  (closed-form rows, a different code path), and the direct part vanishes between positions one block apart;
- QK attribution: the pairs sum to the model's ``hook_attn_scores``, and zeroing one query-side feature under the
  frozen linearisation moves the score by exactly minus that feature's row.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VARIANTS, images, make_sae, rrm_with

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attention import head_loadings, qk_attribution
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.circuits.models import ResidualReplacementModel


def _graph(rrm, x):
    g = Attributor(rrm, batch_size=8).attribute(x)
    return g, g.dense()


def _bilinear(rrm, block: int) -> bool:
    """Whether the block's scores are q·k of affine maps of the residual (no q/k norm, no rotary)."""
    parts = rrm.model.blocks[block].parts
    return parts.q_norm is None and f"blocks.{block}.attn.hook_rot_q" not in rrm.model.hook_dict


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_head_loadings_sum_to_the_graphs_edge(variant):
    rrm = rrm_with(variant, "topk", "layer_norm", True)
    x = images(1).double()
    try:
        g, A = _graph(rrm, x)
        index = {(int(g.node_layer[i]), int(g.node_pos[i]), int(g.node_feature[i])): i for i in range(g.n_nodes)}
    except ValueError as e:  # attention-pool / tanh readouts: no graph, the split itself is still checked
        assert "readout" in str(e)
        g = None
    a0, a1 = (acts[0] for acts in rrm.feature_acts(x)[:2])
    pos = a0.shape[0] - 1  # a patch
    source = (0, pos, int(a0[pos].nonzero()[0]))
    checked = 0
    for t_pos in (pos, 0):  # the same position, then another one (the CLS or first token)
        for t_feat in a1[t_pos].nonzero().flatten()[:2].tolist():
            target = (1, t_pos, t_feat)
            h = head_loadings(rrm, x, source, target)
            scale = max(1.0, abs(h.edge))
            assert abs(h.direct + float(h.heads.sum()) - h.edge) < 1e-9 * scale
            assert len(h.heads) == rrm.model.cfg.n_heads
            if g is not None:
                assert abs(h.edge - float(A[index[target], index[source]])) < 1e-9 * scale, (source, target)
            if t_pos != pos:  # residual and MLP act per position: only attention moves information
                assert abs(h.direct) < 1e-12 and h.heads.abs().max() > 1e-12
            checked += 1
    assert checked == 4


def test_head_loadings_of_an_edge_into_the_output_through_a_later_block():
    model = HookedViT.from_model(rrm_with("timm_cls", "topk", "none", True).model.wrapped).double()
    rrm = ResidualReplacementModel(model, [make_sae("topk", "none", True, hook="blocks.0.hook_resid_post")])
    x = images(1).double()
    g, A = _graph(rrm, x)
    target = next(i for i, k in enumerate(g.node_kind) if k == "target")
    s = max((i for i, k in enumerate(g.node_kind) if k == "feature"), key=lambda i: abs(float(A[target, i])))
    source, c = (0, int(g.node_pos[s]), int(g.node_feature[s])), g.target_classes[0]
    h = head_loadings(rrm, x, source, ("output", c))
    assert h.block == 1
    assert abs(h.direct + float(h.heads.sum()) - h.edge) < 1e-9 * max(1.0, abs(h.edge))
    # the edge is the frozen intervention's response (rrm.intervene, one image at a time) ...
    base, moved = (rrm.intervene(x, edit, freeze=True)["output"][0] for edit in ([], [(0, *source[1:], 0.0)]))
    direction = -torch.full_like(base, 1 / len(base))
    direction[c] += 1
    assert abs(h.edge - float((base - moved) @ direction)) < 1e-12 * max(1.0, abs(h.edge))
    # ... and so is the graph's target edge (its demeaned-logit direction was once built in float32: 1.5e-8 off)
    assert abs(h.edge - float(A[target, s])) < 1e-12 * max(1.0, abs(h.edge))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qk_pairs_sum_to_the_score_and_predict_a_frozen_edit(variant):
    rrm = rrm_with(variant, "topk", "layer_norm", True)
    x = images(1).double()
    query, key, head = rrm.model.cfg.n_ctx - 1, 1, 1
    if not _bilinear(rrm, 1):
        with pytest.raises(ValueError, match="q/k norm or rotary embeddings"):
            qk_attribution(rrm, x, 1, head, query=query, key=key)
        return
    qk = qk_attribution(rrm, x, 1, head, query=query, key=key)
    assert qk.query_terms[-2:] == ["error", "bias"] and len(qk.query_terms) == qk.pairs.shape[0]
    # zero the query-side feature with the largest row: under the freeze the score moves by minus its row
    rows = qk.pairs[:-2].sum(1)
    row = int(rows.abs().argmax())
    feature = int(qk.query_terms[row][1:])
    seen = []
    capture = [("blocks.1.attn.hook_attn_scores", lambda t, hook: seen.append(t[0, head, query, key].item()))]
    with rrm.model.hooks(fwd_hooks=capture):
        rrm.intervene(x, [], freeze=True)
        base = seen[-1]  # the frozen model's own score, from another forward than qk_attribution's
        rrm.intervene(x, [(0, query, feature, 0.0)], freeze=True)
    tol = 1e-9 * max(1.0, abs(base))
    assert qk.score == pytest.approx(base, abs=tol)
    assert float(qk.pairs.sum()) == pytest.approx(base, abs=tol)
    assert seen[-1] - base == pytest.approx(-float(rows[row]), abs=tol)


def test_bad_arguments_are_named():
    rrm = rrm_with("timm_cls", "topk", "none", True)
    x = images(1).double()
    with pytest.raises(ValueError, match=r"block=0 reads the residual after block -1, which has no SAE"):
        qk_attribution(rrm, x, 0, 0, query=0, key=1)
    with pytest.raises(ValueError, match=r"head=9 is out of range: block 1 has 4 heads"):
        qk_attribution(rrm, x, 1, 9, query=0, key=1)
    with pytest.raises(ValueError, match=r"query=99 is not a token position of this model \(0\.\.16"):
        qk_attribution(rrm, x, 1, 0, query=99, key=1)
    with pytest.raises(ValueError, match=r"traces one image"):
        qk_attribution(rrm, images(2).double(), 1, 0, query=0, key=1)
    acts = rrm.feature_acts(x)[0][0, 3]
    dead = int((acts == 0).nonzero()[0])
    with pytest.raises(ValueError, match="is not active on this image"):
        head_loadings(rrm, x, (0, 3, dead), (1, 3, 0))
    live = int(acts.nonzero()[0])
    with pytest.raises(ValueError, match=r"target layer 0: edges from SAE layer 0 go to the next SAE layer \(1\)"):
        head_loadings(rrm, x, (0, 3, live), (0, 3, 0))
    with pytest.raises(ValueError, match=r"\('output', c\) is a target of the last SAE layer \(1\) only"):
        head_loadings(rrm, x, (0, 3, live), ("output", 0))
    torch.manual_seed(0)
