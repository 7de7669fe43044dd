"""Short name of :mod:`selfforcing.models.wan.kv_cache` (the same module object)."""

import sys

from .wan import kv_cache

sys.modules[__name__] = kv_cache
