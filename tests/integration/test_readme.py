"""The README's quickstart runs as written (its first Python block)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[2] / "README.md").read_text()
    first, second, third, fourth, fifth = re.findall(r"```python\n(.*?)```", text, flags=re.S)[:5]
    namespace: dict = {}
    exec(compile(first, "README.md", "exec"), namespace)
    assert namespace["cache"]["blocks.3.hook_resid_post"].shape == (16, 65, 128)
    assert namespace["resid"].shape == (16, 65, 128)
    assert not torch.allclose(namespace["ablated"], namespace["logits"])

    monkeypatch.chdir(tmp_path)  # the training block writes runs/shapes; shrink it to test speed
    exec(compile(second.replace("300_000", "12_000"), "README.md", "exec"), namespace)
    assert len(namespace["saes"]) == 6
    assert namespace["cache"]["blocks.3.hook_resid_post.hook_sae_acts_post"].shape == (16, 65, 512)
    assert namespace["sae"].cfg.metadata.model_name == "sve:shapes-vit"  # the shipped one, loaded last

    exec(compile(third, "README.md", "exec"), namespace)
    assert (tmp_path / "f73.png").exists() and (tmp_path / "dash" / "index.html").exists()
    assert namespace["stats"].n_images == 16
    assert namespace["analyses"]["blocks.3.hook_resid_post"].label(73).startswith("ring (shape), layer 3, AUROC")
    # what the comment claims: the README's 16 images' rings are the feature's top images
    labels, stats = namespace["labels"], namespace["stats"]
    top = [int(labels[i]) for _, i, _ in stats.top_examples(feature=73)[:3]]
    assert top == [sve_shapes().index("ring")] * 3 == [lab for lab in labels.tolist() if lab == top[0]], top
    assert namespace["lens"].shape == (512, 6)
    # the example features are live on the README's images (a dead one would show nothing)
    for f in {int(m) for m in re.findall(r"feature=(\d+)", third)}:
        assert int(namespace["stats"].fire_images[f]) >= 3, f

    exec(compile(fourth, "README.md", "exec"), namespace)
    assert (tmp_path / "ct" / "shapes.json").exists() and (tmp_path / "graph.html").exists()
    model, pixels = namespace["model"], namespace["pixels"]
    for layer, f in {(int(a), int(b)) for a, b in re.findall(r"\((\d+), None, (\d+), 0\.0\)", fourth)}:
        sae = namespace["rrm"].saes[layer]
        _, cache = model.run_with_cache(pixels[:1], names_filter=[sae.cfg.metadata.hook_name])
        assert float(sae.encode(cache[sae.cfg.metadata.hook_name])[0, :, f].max()) > 0, (layer, f)
    assert 0 < namespace["pruned"].scores()["replacement"] <= 1
    assert namespace["ev"].n_images == 2
    assert namespace["found"].associated_class == sve_shapes().index("circle")
    assert len(namespace["found"].selected) > 0

    exec(compile(fifth, "README.md", "exec"), namespace)
    agg, paper = namespace["agg"], namespace["paper"]
    assert paper.layers == [0, 1, 2, 3, 4] and len(agg.relevance) == 5
    assert agg.edges[0].shape == (paper.saes[1].cfg.d_sae + 1, paper.saes[0].cfg.d_sae + 1)
    assert namespace["seed_ev"].errors == "clean" and set(namespace["seed_ev"].curves) >= {"relevance", "neurons"}


def sve_shapes():
    import sae_vision_ext as sve

    return sve.SHAPES
