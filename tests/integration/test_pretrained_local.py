"""The real ``from_pretrained`` loading code of each family, on local files (no hub is reachable here)."""

from __future__ import annotations

import json

import torch
from helpers import IMG, _open_clip_full_clip, build_native, images

from sae_vision_ext import HookedViT


@torch.no_grad()
def test_hf_local_folder_with_image_processor(tmp_path):
    import transformers

    native = build_native("hf_vit_classifier")
    native.save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                                               size={"height": IMG, "width": IMG}, resample=2)  # fmt: skip
    processor.save_pretrained(tmp_path)
    model = HookedViT.from_pretrained(f"hf:{tmp_path}")
    assert type(model.wrapped).__name__ == "ViTForImageClassification" and model.cfg.model_name == f"hf:{tmp_path}"
    x = images()
    torch.testing.assert_close(model(x), native(pixel_values=x).logits, atol=1e-5, rtol=0)
    cfg = model.data_config
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6) and cfg["interpolation"] == "bilinear"
    random = HookedViT.from_pretrained(f"hf:{tmp_path}", pretrained=False)  # same architecture, fresh weights
    assert random.cfg.n_layers == model.cfg.n_layers and not torch.allclose(random(x), model(x))


@torch.no_grad()
def test_hf_clip_repo_gives_the_vision_tower(tmp_path):
    import transformers

    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=50)  # fmt: skip
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=IMG, patch_size=8)  # fmt: skip
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=16)).eval()  # fmt: skip
    clip.save_pretrained(tmp_path)
    model = HookedViT.from_pretrained(f"hf:{tmp_path}")
    assert type(model.wrapped).__name__ == "CLIPVisionModelWithProjection"
    x = images()
    expected = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_timm_pretrained_from_local_file(tmp_path):
    import timm

    native = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # 1000 classes, as the tag
    torch.save(native.state_dict(), tmp_path / "weights.pth")
    model = HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained=True,
                                      pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")})  # fmt: skip
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model(x), native(x), atol=1e-5, rtol=0)
    assert model.data_config["input_size"] == (3, 224, 224)


@torch.no_grad()
def test_open_clip_local_dir(tmp_path):
    from safetensors.torch import save_file

    native = _open_clip_full_clip().eval()
    vision = dict(image_size=IMG, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text, "quick_gelu": True},
              "preprocess_cfg": {"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2]}}  # fmt: skip
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    model = HookedViT.from_pretrained(f"open_clip:local-dir:{tmp_path}")
    x = images()
    torch.testing.assert_close(model(x), native.encode_image(x), atol=1e-5, rtol=0)
    assert model.data_config["mean"] == (0.3, 0.3, 0.3)
