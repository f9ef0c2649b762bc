"""``python -m sae_vision_ext.cli``: the ``sae-vision`` command (torchrun launches it this way)."""

import sys

from . import main

sys.exit(main())
