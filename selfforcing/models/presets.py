"""Short name of :mod:`selfforcing.models.wan.presets` (the same module object)."""

import sys

from .wan import presets

sys.modules[__name__] = presets
