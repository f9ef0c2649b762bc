"""Reading checkpoint files safely: shared by every SAE format converter."""

from __future__ import annotations

from typing import Any

import torch


def sae_lens_version() -> str:
    """Marks converted configs as SAELens >= 6 so it keeps their ``metadata`` as given."""
    import sae_lens

    return sae_lens.__version__


def torch_load(source: Any, device: str, allow_pickle: bool, what: str) -> Any:
    """``torch.load(weights_only=True)``; a file that needs full unpickling raises ``ValueError`` unless
    ``allow_pickle``, and a corrupt or truncated file raises ``ValueError`` saying so (never suggesting
    the unsafe opt-in for it)."""
    import pickle

    try:
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(
                f"{what} is corrupt or truncated ({type(e).__name__}: {e}). Download or save it again."
            ) from e
        if not allow_pickle:
            raise ValueError(
                f"{what} cannot be loaded with torch.load(weights_only=True): it holds pickled Python objects "
                f"({type(e).__name__}). If you trust the file, pass allow_pickle=True."
            ) from e
    except Exception as e:  # zip reader errors, EOF, bad magic number: the bytes are not a whole torch file
        raise ValueError(f"{what} is corrupt or truncated ({type(e).__name__}: {e}). Download or save it again.") from e
    if hasattr(source, "seek"):
        source.seek(0)
    return torch.load(source, map_location=device, weights_only=False)
