"""The HTML dashboard: its numbers recompute from the model, and it works in a real browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import launch_chromium

import sae_vision_ext as sve
from sae_vision_ext.circuits.evaluate.logit_lens import logit_lens, top_bottom
from sae_vision_ext.vis.dashboard import build_dashboard, choose_feature_pages
from sae_vision_ext.vis.stats import FeatureStats, collect_feature_stats

LAYERS = (1, 4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in LAYERS]
    data = sve.make_shapes(64, seed=21, balanced=True)
    x, y = data.tensors()
    pixels = model.preprocess(x)
    out = tmp_path_factory.mktemp("dash")
    stats = collect_feature_stats(model, saes, pixels, y, top_k=4, progress=False)
    # "a traced circuit's" features: the rarest live feature of each layer (no other reason picks it)
    extra = {}
    for sae in saes:
        s = stats[sae.cfg.metadata.hook_name]
        live = (s.fire_tokens > 0).nonzero().squeeze(1)
        extra[sae.cfg.metadata.hook_name] = [int(live[s.fire_tokens[live].argmin()])]
    lens = logit_lens(model, saes, pixels[:4])
    index = build_dashboard(
        model,
        saes,
        pixels,
        out,
        labels=y,
        label_names=sve.SHAPES,
        top_k=4,
        n_feature_pages=3,
        n_image_pages=2,
        progress=False,
        stats=stats,
        logit_lens=lens,
        extra_features=extra,
    )
    return model, saes, pixels, y, out, index, stats, extra, lens


def test_layout_and_saved_stats(built):
    _model, _saes, _pixels, _y, out, index, stats_all, extra, _ = built
    assert index == out / "index.html"
    for layer in LAYERS:
        d = out / f"blocks.{layer}.hook_resid_post"
        pages = sorted(d.glob("f*.html"))
        chosen = choose_feature_pages(
            stats_all[f"blocks.{layer}.hook_resid_post"], 3, extra[f"blocks.{layer}.hook_resid_post"]
        )
        assert sorted(pages) == sorted(d / f"f{f}.html" for f in chosen) and len(pages) == 4
        assert all(p.with_suffix(".png").exists() for p in pages)
        stats = FeatureStats.load(out / "stats" / f"blocks.{layer}.hook_resid_post")
        assert stats.n_images == 64
        table = (d / "index.html").read_text()
        assert table.count("<tr>") - 1 == int((stats.fire_tokens > 0).sum()), "every live feature is listed"
    assert (out / "images" / "img0.html").exists() and (out / "images" / "img1.png").exists()
    assert (out / "layer_evolution.png").exists() and (out / "density.png").exists()


@torch.no_grad()
def test_listed_activations_recompute_from_the_model(built):
    model, saes, pixels, _y, out, *_ = built
    checked = 0
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        for page in (out / hook).glob("f*.html"):
            feature = int(page.stem[1:])
            rows = re.findall(
                r'class="act" data-image="(\d+)" data-token="(\d+)" data-v="([-\d.e]+)"', page.read_text()
            )
            assert rows, page
            values = [float(v) for _, _, v in rows]
            assert values == sorted(values, reverse=True)
            for image, token, value in rows:
                _, cache = model.run_with_cache(pixels[int(image) : int(image) + 1], names_filter=hook)
                acts = sae.encode(cache[hook])[0, :, feature]
                assert abs(float(acts[int(token)]) - float(value)) < 1e-4
                assert abs(float(acts.max()) - float(value)) < 1e-4, "the listed token is the image's peak"
                checked += 1
    assert checked >= 6


def test_rebuild_from_saved_stats_without_recomputing(built, tmp_path, monkeypatch):
    model, saes, pixels, y, out, *_ = built
    stats = {s.cfg.metadata.hook_name: FeatureStats.load(out / "stats" / s.cfg.metadata.hook_name) for s in saes}
    from sae_vision_ext.vis import dashboard

    monkeypatch.setattr(dashboard, "collect_feature_stats", lambda *a, **k: pytest.fail("recomputed the stats"))
    build_dashboard(
        model,
        saes,
        pixels,
        tmp_path,
        labels=y,
        label_names=sve.SHAPES,
        n_feature_pages=1,
        n_image_pages=1,
        stats=stats,
        progress=False,
    )
    assert (tmp_path / "index.html").exists()


@pytest.mark.browser
def test_pages_load_in_headless_chromium_with_all_images(built):
    from playwright.sync_api import sync_playwright

    _, _, _, _, out, *_ = built
    pages = [out / "index.html", *sorted(out.glob("blocks.*/*.html")), *sorted((out / "images").glob("*.html"))]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        for html in pages:
            page.goto(Path(html).as_uri())
            page.wait_for_load_state("load")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            assert broken == [], f"{html}: images not loaded {broken}"
            links = page.evaluate("Array.from(document.links).map(a => a.href)")
            for href in links:
                target = Path(href.removeprefix("file://"))
                assert target.exists(), f"{html}: dead link {href}"
        page.goto((out / "blocks.1.hook_resid_post" / "index.html").as_uri())
        page.click("th:nth-child(5)")  # max activation column, ascending
        first = page.evaluate(
            "Array.from(document.querySelectorAll('tbody tr td:nth-child(5)')).map(t => +t.dataset.v)"
        )
        assert first == sorted(first)
        page.click("th:nth-child(5)")
        second = page.evaluate(
            "Array.from(document.querySelectorAll('tbody tr td:nth-child(5)')).map(t => +t.dataset.v)"
        )
        assert second == sorted(second, reverse=True)
        browser.close()
    assert errors == [], errors


def test_pages_cover_what_users_look_for_with_reasons_and_logit_lens(built):
    _model, saes, _pixels, y, out, _index, stats, extra, lens = built
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        s = stats[hook]
        chosen = choose_feature_pages(s, 3, extra[hook])
        live = s.fire_tokens > 0
        enough = live & (s.fire_images >= 3)
        rankings = {
            "max activation": torch.where(live, s.max_act, torch.tensor(-1.0)),
            "class-selective": torch.where(enough, s.class_selectivity, torch.tensor(-1.0)),
            "position-bound": torch.where(enough, s.spatial_concentration, torch.tensor(-1.0)),
        }
        for reason, ranking in rankings.items():  # a leader of each ranking (ties allowed) has a page saying why
            leaders = [f for f, why in chosen.items() if reason in why]
            assert leaders and max(float(ranking[f]) for f in leaders) == float(ranking.max()), (hook, reason)
        (f_extra,) = extra[hook]
        assert chosen[f_extra][0] == "in circuit"
        assert choose_feature_pages(s, 3, [int((~live).nonzero()[0])] if (~live).any() else []).keys() <= set(
            live.nonzero().squeeze(1).tolist()
        )  # a dead "circuit" feature gets no page
        for f in chosen:
            html = (out / hook / f"f{f}.html").read_text()
            assert ", ".join(chosen[f]) in html
            top, bottom = top_bottom(lens[hook], f, sve.SHAPES)
            assert ", ".join(top) in html and ", ".join(bottom) in html
            # the label column names each top image by its own label (indexed by image, not by rank)
            for image, label in re.findall(r'data-image="(\d+)".*?<td class="l">(\w+)</td></tr>', html, re.S):
                assert label == sve.SHAPES[int(y[int(image)])]
