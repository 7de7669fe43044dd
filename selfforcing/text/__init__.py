"""Text encoders (MiniLM offline, UMT5 from a local folder) and the on-disk embedding cache."""

from .encoders import (
    CachedTextEncoder,
    MiniLMTextEncoder,
    TextEmbedding,
    TextEncoder,
    UMT5TextEncoder,
    build_text_encoder,
)

__all__ = ["CachedTextEncoder", "MiniLMTextEncoder", "TextEmbedding", "TextEncoder", "UMT5TextEncoder",
           "build_text_encoder"]
