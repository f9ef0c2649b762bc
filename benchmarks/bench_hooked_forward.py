"""HookedViT forward time against the native model, measured in one run.

    python benchmarks/bench_hooked_forward.py [--batch 8] [--repeats 10] [--models timm,open_clip,hf]
    python -m benchmarks.bench_hooked_forward --models eva02,dinov3,pe_core,hf_dinov3,hf_aimv2  # 2026 backbones
    python -m benchmarks.bench_hooked_forward --models naflex,hf_siglip2  # NaFlex (fixed 224 px input)

Contenders per model (random weights, float32, torch.no_grad, CPU threads as the machine has):
native forward; HookedViT with no hooks; with the full residual cache (resid_pre/mid/post of every
layer); with every hook cached (attention patterns materialised). Goals: no hooks <= 1.05x native,
full residual cache <= 1.3x.
"""

from __future__ import annotations

import argparse
import platform

import torch

from benchmarks._timing import interleaved_medians, markdown_table
from sae_vision_ext import HookedViT

MODELS = {
    "timm": ("timm:vit_base_patch16_224", {}),
    "open_clip": ("open_clip:ViT-B-32", {}),
    "hf": ("hf_vit_base", {}),
    # the 2026 backbones at ViT-B size (timm Eva: RoPE, SwiGLU + sub-LN, registers, LayerScale)
    "eva02": ("timm:eva02_base_patch16_clip_224", {}),
    "dinov3": ("timm:vit_base_patch16_dinov3", {"img_size": 224}),
    "pe_core": ("timm:vit_pe_core_base_patch16_224", {}),
    "naflex": ("timm:naflexvit_base_patch16_gap", {}),  # NaFlex: patchifies itself, here 224 px images
}
_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)


def _hf_2026(kind: str) -> HookedViT:
    import transformers as tf

    if kind == "hf_dinov3":  # ViT-B/16 with 4 registers, RoPE, LayerScale
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(intermediate_size=3072, num_register_tokens=4, **_B))
    elif kind == "hf_siglip2":  # SigLIP 2 NaFlex at ViT-B/16, 196 patches (14 x 14 at 224 px)
        cfg = {k: v for k, v in _B.items() if k != "image_size"}
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(intermediate_size=3072, num_patches=196, **cfg))
    else:  # AIMv2 at ViT-B width: RMSNorm, SwiGLU, attention-pool head
        model = tf.Aimv2VisionModel(tf.Aimv2VisionConfig(intermediate_size=2048, **_B))
    return HookedViT.from_model(model.eval(), model_name=f"hf:{kind.removeprefix('hf_')}-base")


def build(kind: str) -> HookedViT:
    if kind == "hf":
        import transformers

        cfg = transformers.ViTConfig(image_size=224, patch_size=16, num_labels=1000)
        return HookedViT.from_model(transformers.ViTForImageClassification(cfg).eval(), model_name="hf:vit-base")
    if kind in ("hf_dinov3", "hf_aimv2", "hf_siglip2"):
        return _hf_2026(kind)
    model_id, kwargs = MODELS[kind]
    return HookedViT.from_pretrained(model_id, pretrained=False, **kwargs)


@torch.no_grad()
def time_contenders(model: HookedViT, x: torch.Tensor, repeats: int) -> dict[str, float]:
    def resid(name: str) -> bool:
        return ".hook_resid_" in name

    return interleaved_medians(
        {
            "native": lambda: model.adapter.native_forward(x),
            "hooked": lambda: model(x),
            "resid_cache": lambda: model.run_with_cache(x, names_filter=resid),
            "all_cache": lambda: model.run_with_cache(x),
        },
        repeats=repeats,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--models", default="timm,open_clip,hf")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as the machine has)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    for kind in args.models.split(","):
        model = build(kind).eval()
        t = time_contenders(model, torch.randn(args.batch, 3, *model.cfg.image_size), args.repeats)
        base = t["native"]
        rows.append(
            [
                model.cfg.model_name,
                args.batch,
                f"{base * 1e3:.0f}",
                f"{t['hooked'] * 1e3:.0f} ({t['hooked'] / base:.3f}x)",
                f"{t['resid_cache'] * 1e3:.0f} ({t['resid_cache'] / base:.3f}x)",
                f"{t['all_cache'] * 1e3:.0f} ({t['all_cache'] / base:.3f}x)",
            ]
        )
    header = ["model", "batch", "native ms", "hooked, no hooks", "resid cache (3 per layer)", "every hook cached"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
