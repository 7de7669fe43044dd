"""Build a text encoder from a name or a local folder, optionally behind the on-disk embedding cache."""

from __future__ import annotations

import os

import torch

from .cache import CachedTextEncoder
from .encoders import MiniLMTextEncoder, TextEncoder, UMT5TextEncoder, read_model_type


def build_text_encoder(name_or_path: str, text_len: int | None = None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype | str = torch.float32, cache_dir: str | None = None) -> TextEncoder:
    """A text encoder from a name or a local folder.

    * ``"minilm"`` (or ``"all-minilm-l6-v2"``): :class:`MiniLMTextEncoder` (``text_len`` default 24, the laptop
      recipes' length: a Moving-Digits caption is 7-19 tokens);
    * a folder whose ``config.json`` (or ``text_encoder/config.json``) says ``model_type: umt5``:
      :class:`UMT5TextEncoder` (``text_len`` default: Wan's, run in ``dtype``);
    * a folder whose ``config.json`` says ``model_type: bert``: :class:`MiniLMTextEncoder` on it.

    With ``cache_dir`` the encoder is wrapped in :class:`~selfforcing.text.cache.CachedTextEncoder`."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"text encoder must be a name or a folder path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path.lower() in ("minilm", "all-minilm-l6-v2"):
        encoder: TextEncoder = MiniLMTextEncoder(text_len or 24, device)
    elif os.path.isdir(name_or_path):
        config_dir = name_or_path
        if not os.path.isfile(os.path.join(config_dir, "config.json")):
            config_dir = os.path.join(name_or_path, "text_encoder")
        if not os.path.isfile(os.path.join(config_dir, "config.json")):
            raise FileNotFoundError(f"{name_or_path} has no config.json (nor text_encoder/config.json): "
                                    "not a text-encoder folder")
        model_type = read_model_type(config_dir)
        if model_type == "umt5":
            encoder = UMT5TextEncoder(name_or_path, text_len or None, dtype=dtype, device=device)
        elif model_type == "bert":
            encoder = MiniLMTextEncoder(text_len or 32, device, path=name_or_path)
        else:
            raise ValueError(f"{config_dir}/config.json has model_type {model_type!r}; "
                             "supported text encoders are 'umt5' and 'bert'")
    else:
        raise ValueError(f"unknown text encoder {name_or_path!r}: use 'minilm' or an existing local folder "
                         "(UMT5 or BERT, transformers format)")
    if cache_dir is not None:
        encoder = CachedTextEncoder(encoder, cache_dir)
    return encoder
