"""Checkpoint formats -> the native (diffusers-named) state dict, and back.

Formats read:
* native / diffusers: keys such as ``blocks.0.attn1.to_q.weight`` (``save_pretrained`` directories,
  safetensors files, our training checkpoints);
* original Wan2.1: ``blocks.0.self_attn.q.weight`` ..., optionally under ``model.`` (the Self Forcing
  and CausVid wrappers) or ``model.diffusion_model.``, and optionally wrapped in a dict under
  ``generator`` / ``generator_ema`` (the Self Forcing and CausVid releases) or ``model`` / ``state_dict``.

Original keys are renamed by diffusers' own ``convert_wan_transformer_to_diffusers``; the inverse,
:func:`to_original_wan`, is ours (for exporting to tools that expect the original layout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ...errors import reason

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def unwrap_checkpoint(obj, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Pick the generator's state dict out of a training checkpoint dict.

    ``use_ema`` selects ``generator_ema`` and fails (naming the keys present) if it is missing.
    A flat dict of tensors is returned as is.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, expected a dict of tensors or of state dicts")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if use_ema:
            raise ValueError("use_ema was requested but the checkpoint is a bare state dict with no 'generator_ema'")
        return dict(obj)
    keys = ("generator_ema",) if use_ema else ("generator", "model", "state_dict", "generator_ema")
    for k in keys:
        if k in obj and isinstance(obj[k], Mapping):
            return unwrap_checkpoint(obj[k])
    raise ValueError(
        f"no generator weights in checkpoint: looked for {list(keys)}, found keys {sorted(map(str, obj))[:20]}"
    )


def is_original_wan_format(sd: Mapping[str, torch.Tensor]) -> bool:
    """True if the keys use the original Wan names (self_attn / cross_attn / head.head ...)."""
    return any(".self_attn." in k or k.endswith("head.head.weight") for k in sd)


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:
            k = k.replace(p, "")
        if k.startswith("model.") and not k.startswith("model.diffusion_model."):
            k = k[len("model."):]  # the Self Forcing / CausVid WanDiffusionWrapper
        out[k] = v
    return out


def from_original_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys (any of the prefixes above) -> diffusers keys, via diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = {k: v for k, v in _strip_prefixes(sd).items() if k != "freqs"}  # rope table: not a parameter here
    return convert_wan_transformer_to_diffusers(sd)


def to_native(obj, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Any supported checkpoint object -> a native state dict."""
    sd = unwrap_checkpoint(obj, use_ema=use_ema)
    sd = _strip_prefixes(sd)
    return from_original_wan(sd) if is_original_wan_format(sd) else sd


_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def to_original_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (diffusers) keys -> original Wan2.1 keys (norm2/norm3 swapped back, modulation names)."""
    out = {}
    for k, v in sd.items():
        n = k
        for a, b in _TO_ORIGINAL:
            n = n.replace(a, b)
        if n == "scale_shift_table":
            n = "head.modulation"
        elif n.endswith(".scale_shift_table"):
            n = n[: -len("scale_shift_table")] + "modulation"
        elif ".norm2." in n:  # diffusers' cross-attention norm is the original's norm3
            n = n.replace(".norm2.", ".norm3.")
        out[n] = v
    return out


def load_checkpoint_file(path: str | os.PathLike, use_ema: bool = False, *, with_architecture: bool = False):
    """Read a ``.pt``/``.pth``/``.safetensors`` checkpoint file into a native state dict; with ``with_architecture``,
    (state dict, the generator's config recorded by our trainer or None).

    Errors name the file: missing, unreadable/corrupt, or holding no generator weights.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise ValueError(f"cannot read checkpoint {path}: {reason(err)} (truncated or not a checkpoint)") from err
    try:
        state = to_native(obj, use_ema=use_ema)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if not with_architecture:
        return state
    archs = obj.get("architectures") if isinstance(obj, dict) else None
    return state, (archs.get("generator") if isinstance(archs, dict) else None)
