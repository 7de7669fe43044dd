"""The FFN's CPU kernels: oneDNN's linear with the tanh-GELU fused in, or the model's feature-major BLAS path, the
faster of the two timed at the first call of each shape (:func:`~selfforcing.accel.cpu.timing.fastest_name`).

``SELFFORCING_CPU_FFN`` = ``auto`` (default: timed) | ``onednn`` | ``feature_major`` fixes the choice; ``onednn`` falls
back to ``feature_major`` on builds without oneDNN.
"""

from __future__ import annotations

import functools
import os

import torch

from .timing import fastest_name

FFN_ENV = "SELFFORCING_CPU_FFN"
FFN_SETTINGS = ("auto", "onednn", "feature_major")


def ffn_setting() -> str:
    """``SELFFORCING_CPU_FFN``; a bad value is a ValueError that names the variable."""
    value = os.environ.get(FFN_ENV, "auto")
    if value not in FFN_SETTINGS:
        raise ValueError(f"{FFN_ENV}={value!r}: expected one of {', '.join(FFN_SETTINGS)}")
    return value


def _linear_pointwise(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear + pointwise op for float32 CPU tensors (x86 builds do;
    others fall back to BLAS). Probed once by running it on a tiny input."""
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        out = _linear_pointwise(x, w, torch.zeros(4), "gelu", [], "tanh")
        return tuple(out.shape) == (2, 4)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def forward_onednn(ffn, x: torch.Tensor) -> torch.Tensor:
    """``ffn(x)`` through oneDNN's matmul with the tanh-GELU fused into the first product (the activation is applied
    to each output tile while it is still in cache, instead of several passes over the [N, ffn_dim] hidden state).
    The same function as the model's FFN to float rounding (tests/test_perf.py)."""
    up, down = ffn.net[0].proj, ffn.net[2]
    h = _linear_pointwise(x.reshape(-1, x.shape[-1]), up.weight, up.bias, "gelu", [], "tanh")
    return _linear_pointwise(h, down.weight, down.bias, "none", [], "").view(*x.shape[:-1], down.out_features)


def kernels(ffn) -> dict:
    """The FFN implementations by name (oneDNN's only where this torch build has it)."""
    paths = {"onednn": functools.partial(forward_onednn, ffn), "feature_major": ffn.forward_feature_major}
    if not onednn_linear_available():
        del paths["onednn"]
    return paths


def choose(ffn, x: torch.Tensor, paths: dict, kind: str = "cpu_ffn") -> str:
    """The kernel to run ``ffn`` on ``x`` [..., D]: the setting, or under ``auto`` the faster of ``paths`` (name ->
    implementation) for this shape and thread count, timed once per process under the key ``(kind, rows, D,
    ffn_dim, threads)``."""
    setting = ffn_setting()
    if setting != "auto":
        return setting if setting in paths else "feature_major"
    up = ffn.net[0].proj
    key = (kind, x.numel() // x.shape[-1], up.in_features, up.out_features, torch.get_num_threads())
    return fastest_name(key, paths, (x,))


def feed_forward(ffn, x: torch.Tensor) -> torch.Tensor:
    """``ffn(x)`` for float32 CPU inference through the chosen kernel."""
    paths = kernels(ffn)
    return paths[choose(ffn, x, paths)](x)
