"""Named model configurations (the config registry) and the sizes each is run at. Sizes live here (and, for a
trained model, in its checkpoint's ``pipeline.json``) and nowhere else.

``tiny`` and ``small`` are the laptop models trained on Moving-Digits: 64x64 frames through a 4x
autoencoder give 16x16 latents, i.e. 64 tokens per latent frame with patch (1, 2, 2), and MiniLM text
states of width 384. The Wan presets are the released Wan2.1-T2V configurations.
"""

from __future__ import annotations

from typing import Any

# What the laptop presets share with Wan2.1's released configurations.
_SHARED: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
    num_frame_per_block=3,
)

_WAN_COMMON: dict[str, Any] = dict(_SHARED, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096)

# The sizes a preset is run at when neither the caller nor a checkpoint says (the benchmarks, a randomly initialised
# model): latent size (h, w), training length in latent frames, text tokens, and the shift of the few-step timesteps.
# The laptop presets: 64x64 frames through the 4x autoencoder, 12-frame clips, MiniLM captions. Wan2.1: 480x832 frames
# through the 8x VAE, 81 pixel frames = 21 latent frames, UMT5's 512 tokens.
_LAPTOP_SIZES: dict[str, Any] = dict(latent_size=(16, 16), train_frames=12, text_len=16, shift=5.0)
_WAN_SIZES: dict[str, Any] = dict(latent_size=(60, 104), train_frames=21, text_len=512, shift=5.0)

_LAPTOP_COMMON: dict[str, Any] = dict(_SHARED, in_channels=8, out_channels=8, text_dim=384)

# Absolute positions beside Wan's relative ones (CausalWanModel.ABSOLUTE_EMBEDDING_KEYS), sized for the laptop presets'
# clips: one embedding per frame of the training clip and one per token of the latent grid. Not in the presets: a
# teacher trained with them (runs/tiny3) had a higher loss at every step than the same run without, and did not learn
# the direction words either (docs/tiny_model.md). A recipe turns them on with `generator.overrides`.
LAPTOP_ABSOLUTE_POSITIONS: dict[str, Any] = dict(
    num_frame_embeddings=_LAPTOP_SIZES["train_frames"],
    spatial_embedding_grid=[n // p for n, p in zip(_LAPTOP_SIZES["latent_size"], _SHARED["patch_size"][1:])])

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.9M parameters: dim 128 = 2 heads x 64. Not 4 x 32: with q/k RMS-normalised across heads, an evenly spread
    # head's largest logit is about sqrt(head_dim) (5.7 for 32), so over 768 keys attention cannot be sharp until
    # the norm gains grow, which AdamW does slowly; a 4 x 32 teacher after 1,500 steps still attended almost
    # uniformly (entropy 4.3-6.4 nats of the uniform 6.6) and its frames did not follow each other. Wan uses 128.
    "tiny": dict(_LAPTOP_COMMON, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, num_layers=6),
    # ~8.7M parameters: dim 256 = 4 heads x 64
    "small": dict(_LAPTOP_COMMON, num_attention_heads=4, attention_head_dim=64, ffn_dim=1536, num_layers=6),
    # Wan2.1-T2V-1.3B: dim 1536, 30 layers (1.419B parameters)
    "wan2.1-t2v-1.3b": dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    # Wan2.1-T2V-14B: dim 5120, 40 layers
    "wan2.1-t2v-14b": dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


RUN_SIZES: dict[str, dict[str, Any]] = {"tiny": _LAPTOP_SIZES, "small": _LAPTOP_SIZES,
                                        "wan2.1-t2v-1.3b": _WAN_SIZES, "wan2.1-t2v-14b": _WAN_SIZES}


def preset_sizes(name: str) -> dict[str, Any]:
    """The run sizes of preset ``name`` (see ``RUN_SIZES``); a preset without them is a ValueError naming it."""
    if name not in RUN_SIZES:
        raise ValueError(f"model preset {name!r} has no run sizes; give them explicitly (one of {sorted(RUN_SIZES)} "
                         f"has them)")
    return dict(RUN_SIZES[name])


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The config dict of preset ``name`` with ``overrides`` applied (unknown preset: ValueError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}
