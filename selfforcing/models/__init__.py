"""Models: one folder per model family (``wan/``: the causal Wan DiT, its KV cache, presets and checkpoint adapter).

``selfforcing.models.attention``, ``.kv_cache``, ``.presets`` and ``.state_dict_adapter`` are kept as short names of
the Wan family's modules."""

from .wan import PRESETS, CausalWanModel, KVCache, preset_config

__all__ = ["CausalWanModel", "KVCache", "PRESETS", "preset_config"]
