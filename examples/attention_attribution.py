"""Attribution through attention on ``sve:shapes-vit`` with its shipped SAEs: the strongest edge between two
positions split over the heads of the block it crosses, and one attention score split into feature pairs.
Prints the figures in docs/circuits.md ("Through attention").

    python examples/attention_attribution.py
"""

from __future__ import annotations

import time

import torch

import sae_vision_ext as sve


def main() -> None:
    model = sve.HookedViT.from_pretrained("sve:shapes-vit").double()
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post").to(torch.float64) for layer in range(6)]
    rrm = sve.ResidualReplacementModel(model, saes)
    raw, _ = sve.make_shapes(1, seed=3).tensors()
    x = model.preprocess(raw).double()
    graph = rrm.attribute(x)
    dense = graph.dense()
    layer = 2
    kind = torch.tensor([k == "feature" for k in graph.node_kind])
    is_src = kind & (graph.node_layer == layer)
    is_tgt = kind & (graph.node_layer == layer + 1)
    other_pos = graph.node_pos[:, None] != graph.node_pos[None, :]
    masked = dense.abs() * (is_tgt[:, None] & is_src[None, :] & other_pos)
    t, s = divmod(int(masked.argmax()), masked.shape[1])  # the strongest edge between two positions
    source = (layer, int(graph.node_pos[s]), int(graph.node_feature[s]))
    target = (layer + 1, int(graph.node_pos[t]), int(graph.node_feature[t]))
    start = time.perf_counter()
    h = sve.head_loadings(rrm, x, source, target)
    took = time.perf_counter() - start
    print(f"edge {source} -> {target}: graph {float(dense[t, s]):.6f}, frozen intervention {h.edge:.6f}")
    print(f"  direct {h.direct:.2e}; heads " + ", ".join(f"{v:+.4f}" for v in h.heads.tolist()))
    print(f"  direct + heads - edge = {h.direct + float(h.heads.sum()) - h.edge:.1e} ({took:.2f} s)")
    query, key = int(graph.node_pos[t]), int(graph.node_pos[s])
    head = int(h.heads.abs().argmax())
    start = time.perf_counter()
    qk = sve.qk_attribution(rrm, x, layer + 1, head, query=query, key=key)
    took = time.perf_counter() - start
    print(f"\nscore of block {layer + 1}, head {head}, query {query}, key {key}: {qk.score:.6f}")
    print(f"  {qk.pairs.shape[0]} query terms x {qk.pairs.shape[1]} key terms; sum - score = "
          f"{float(qk.pairs.sum()) - qk.score:.1e} ({took:.2f} s); top pairs:")  # fmt: skip
    for q_term, k_term, value in qk.top(5):
        print(f"    {q_term:>6} x {k_term:<6} {value:+.4f}")
    assert torch.isfinite(qk.pairs).all()


if __name__ == "__main__":
    main()
