"""Text encoders (MiniLM offline, UMT5 from a local folder) behind one interface, and the on-disk embedding cache."""

from .build import build_text_encoder
from .cache import CachedTextEncoder
from .encoders import (
    HFTextEncoder,
    MiniLMTextEncoder,
    TextEmbedding,
    TextEncoder,
    UMT5TextEncoder,
    mean_pool,
    minilm_path,
    wan_prompt_clean,
)

__all__ = ["CachedTextEncoder", "HFTextEncoder", "MiniLMTextEncoder", "TextEmbedding", "TextEncoder",
           "UMT5TextEncoder", "build_text_encoder", "mean_pool", "minilm_path", "wan_prompt_clean"]
