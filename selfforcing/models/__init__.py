"""Models: the causal Wan DiT, its KV cache, presets and checkpoint adapters."""

from .causal_wan import CausalWanModel
from .kv_cache import KVCache
from .presets import PRESETS, preset_config

__all__ = ["CausalWanModel", "KVCache", "PRESETS", "preset_config"]
