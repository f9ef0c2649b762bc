"""Old argument spellings keep working for one release, with a DeprecationWarning naming the new one,
and give the same result as the new spelling."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import images, rrm_for

from sae_vision_ext._compat import renamed_kwargs
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.saes.evaluate import evaluate_sae
from sae_vision_ext.vis.stats import collect_feature_stats


@pytest.fixture(scope="module")
def rrm():
    return rrm_for("timm_cls")


def test_renamed_kwargs_maps_warns_and_refuses_both():
    @renamed_kwargs(old="new")
    def f(a: int, new: int = 0) -> int:
        return 10 * a + new

    with pytest.warns(DeprecationWarning, match=r"f\(old=\.\.\.\) is renamed new="):
        assert f(1, old=2) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(1, new=3) == 13
    with pytest.raises(TypeError, match="both 'new' and its old name 'old'"):
        f(1, old=2, new=3)
    assert f.__name__ == "f"


def test_images_is_now_pixels(rrm):
    x = images(2).double()
    sae = rrm.saes[0]
    new = collect_feature_stats(rrm.model, sae, pixels=x, top_k=3, progress=False)
    with pytest.warns(DeprecationWarning, match="renamed pixels="):
        old = collect_feature_stats(rrm.model, sae, images=x, top_k=3, progress=False)
    torch.testing.assert_close(old.tensors["max_act"], new.tensors["max_act"])
    with pytest.warns(DeprecationWarning, match="renamed pixels="):
        metrics = evaluate_sae(rrm.model, sae, images=x)
    assert metrics["fvu"] == evaluate_sae(rrm.model, sae, x)["fvu"]


def test_attribute_targets_is_now_target(rrm):
    x = images(1, seed=3).double()
    att = Attributor(rrm, batch_size=16)
    new = att.attribute(x, target=2, max_feature_nodes=None)
    with pytest.warns(DeprecationWarning, match=r"attribute\(targets=\.\.\.\) is renamed target="):
        old = att.attribute(x, targets=2, max_feature_nodes=None)
    torch.testing.assert_close(old.adjacency.to_dense(), new.adjacency.to_dense())
    assert old.target_classes == new.target_classes == [2]


def test_plot_top_patches_takes_model_first_and_the_old_order_still_works(rrm, tmp_path):
    from sae_vision_ext.vis.plots import plot_top_patches

    x = images(3).double()
    sae = rrm.saes[0]
    stats = collect_feature_stats(rrm.model, sae, x, top_k=2, progress=False)
    f = int(stats.tensors["max_act"].argmax())
    new = plot_top_patches(rrm.model, sae, stats, f, x, path=tmp_path / "new.png")
    with pytest.warns(DeprecationWarning, match="old argument order"):
        old = plot_top_patches(stats, f, x, tmp_path / "old.png", rrm.model, sae)
    with pytest.warns(DeprecationWarning, match="old argument order"):
        readme_old = plot_top_patches(stats, feature=f, images=x, path=tmp_path / "kw.png", model=rrm.model, sae=sae)
    assert new.read_bytes() == old.read_bytes() == readme_old.read_bytes()


@pytest.mark.parametrize("command", ["cache", "train"])
def test_cache_and_train_take_model_like_every_command(command):
    from sae_vision_ext.cli import build_parser
    from sae_vision_ext.cli.training import _training_config

    parser = build_parser()
    new = _training_config(parser.parse_args([command, "--model", "sve:shapes-vit-biased"]))
    assert new.model_name == "sve:shapes-vit-biased"
    with pytest.warns(DeprecationWarning, match="use --model"):
        old = _training_config(parser.parse_args([command, "--model-name", "sve:shapes-vit-biased"]))
    assert old.to_dict() == new.to_dict()
