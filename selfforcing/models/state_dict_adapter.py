"""Short name of :mod:`selfforcing.models.wan.state_dict_adapter` (the same module object)."""

import sys

from .wan import state_dict_adapter

sys.modules[__name__] = state_dict_adapter
