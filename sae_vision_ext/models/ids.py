"""Model ids: ``"<source>:<name>"`` (``timm:``, ``open_clip:``, ``hf:``, ``sve:``) and their other spellings.

Other projects name the same models differently; :func:`canonical_model_id` maps the spellings that
reach this package (ViT-Prisma's ``open-clip:org/repo``, open_clip's ``hf-hub:`` with or without our
prefix, ``timm/`` Hub ids) to the one this package's loaders use, so a check that an SAE belongs to a
model compares models, not spellings (:func:`same_model`).
"""

from __future__ import annotations


def canonical_model_id(name: str) -> str:
    """The loader id for ``name``; ids that are already canonical (or unknown spellings) are returned as is.

    ``open-clip:org/repo`` (ViT-Prisma's spelling, always a Hub repo) -> ``open_clip:hf-hub:org/repo``
    and ``open-clip:ARCH`` -> ``open_clip:ARCH``; ``hf-hub:org/repo`` (open_clip's own) ->
    ``open_clip:hf-hub:org/repo``; ``timm:timm/x`` (a timm Hub id) -> ``timm:x``. ``open_clip:ARCH/TAG``
    is an open_clip pretrained tag and stays."""
    name = name.strip()
    if name.startswith("hf-hub:"):
        return f"open_clip:{name}"
    prefix, sep, rest = name.partition(":")
    if not sep:
        return name
    if prefix == "open-clip":
        if rest.startswith(("hf-hub:", "local-dir:")) or "/" not in rest:
            return f"open_clip:{rest}"
        return f"open_clip:hf-hub:{rest}"
    if prefix == "timm" and rest.startswith("timm/"):
        return f"timm:{rest.removeprefix('timm/')}"
    return name


def same_model(a: str | None, b: str | None) -> bool:
    """``True`` when both ids name the same model after :func:`canonical_model_id` (or one is unknown)."""
    if not a or not b or "unknown" in (a, b):
        return True
    return canonical_model_id(a) == canonical_model_id(b)
