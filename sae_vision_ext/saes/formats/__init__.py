"""Checkpoint formats of other projects, one module each, registered in :data:`FORMATS`.

Importing this package registers every format. ``sae-vision saes`` and ``docs/saes.md`` list them;
:func:`detect_format` tells which one a path is in.
"""

from . import clt, dictionary_learning, overcomplete, prisma, rrm, saelens, saev, sparsify  # noqa: F401  (registration)
from .base import FORMATS, DiskConverter, SAEFormat, detect_format, register_format

__all__ = ["FORMATS", "DiskConverter", "SAEFormat", "detect_format", "register_format"]
