"""The Wan2.1 family, made block-causal: the model, its layers, attention, KV cache, presets and checkpoint adapter."""

from .kv_cache import KVCache
from .model import CausalWanModel, ForwardPlan
from .presets import PRESETS, preset_config

__all__ = ["CausalWanModel", "ForwardPlan", "KVCache", "PRESETS", "preset_config"]
