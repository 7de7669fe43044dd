"""Short name of :mod:`selfforcing.models.wan.attention` (the same module object)."""

import sys

from .wan import attention

sys.modules[__name__] = attention
