"""TransformerLens's ``ActivationCache`` with a ``KeyError`` that names the close keys, as hook names do."""

from __future__ import annotations

import difflib
from typing import Any

from transformer_lens import ActivationCache


class CacheKeyError(KeyError):
    """A cache lookup of a name the cache does not hold; the message lists the closest names held."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument: keep the sentence readable
        return str(self.args[0]) if self.args else ""


class VisionActivationCache(ActivationCache):
    """What ``HookedViT.run_with_cache`` returns: TransformerLens's ``ActivationCache`` (same methods,
    ``cache["blocks.0.hook_resid_post"]``, ``cache["resid_post", 0]``), whose missing keys raise
    :class:`CacheKeyError` (a ``KeyError``) naming the close keys held and how to cache the name."""

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            name = key if isinstance(key, str) else None
            if name is None:
                raise
            held = list(self.cache_dict)
            close = difflib.get_close_matches(name, held, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CacheKeyError(
                f"{name!r} is not in this cache ({len(held)} activations held).{hint} Only hooks matched by "
                "run_with_cache's names_filter (all hooks when None) up to stop_at_layer are cached."
            ) from None
