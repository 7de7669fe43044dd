"""What the model asks its surroundings at run time: may it take its CPU inference shortcuts, and is an accelerator
installed.

* The shortcuts are plain PyTorch (in-place residual updates, a fused RMSNorm, matmul attention over a few text
  tokens, the feature-major FFN) that compute the same function as the autograd path to float rounding. They run for
  float32 CPU forwards without gradients; :func:`plain_pytorch` switches them off (the baseline that
  ``selfforcing bench chunk --compare-plain`` measures against).
* The accelerator hook is the one place where code outside the model (``selfforcing.accel.cpu``) may take over part
  of a forward: :class:`Accelerator`. The model runs without one unless a caller installs it
  (:func:`using_accelerator`); the model itself never imports an accelerator.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

_SHORTCUTS = [True]
_ACCELERATORS: list[Any] = [None]


class Accelerator(Protocol):
    """What the model hands an installed accelerator; each method may decline by returning NotImplemented."""

    def forward(self, model, plan) -> torch.Tensor | None:
        """Run a whole planned forward (``plan``: a :class:`~selfforcing.models.wan.model.ForwardPlan`, conditioned)
        from the patch embedding to the head: v [B, F, C_out, H, W], or None for a cache pass (``plan.kv_only``)."""

    def feed_forward(self, ffn, x: torch.Tensor) -> torch.Tensor:
        """``ffn(x)`` for a float32 CPU inference input x [..., D]."""


@contextlib.contextmanager
def _pushed(stack: list, value):
    stack.append(value)
    try:
        yield value
    finally:
        stack.pop()


def cpu_shortcuts_enabled() -> bool:
    """Whether the model's no-grad CPU shortcuts may run (see :func:`plain_pytorch`)."""
    return _SHORTCUTS[-1]


@contextlib.contextmanager
def plain_pytorch():
    """Within this block the model runs without its CPU inference shortcuts: torch's own kernels (nn.Linear, RMSNorm,
    LayerNorm, tanh-GELU, SDPA for every attention) and out-of-place residual updates, the path that autograd takes;
    no accelerator runs either. The values are the same to float rounding (tests/test_perf.py). Structural choices
    stay (the head-major KV cache written in place, RoPE as a complex product, the cached text K/V)."""
    with _pushed(_SHORTCUTS, False), _pushed(_ACCELERATORS, None):
        yield


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether the CPU inference shortcuts apply to ``x``: float32 on CPU, no autograd, not being traced by
    torch.compile, not switched off (:func:`plain_pytorch`)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and cpu_shortcuts_enabled())


def accelerator() -> Accelerator | None:
    """The installed accelerator, or None (the model's own blocks run)."""
    return _ACCELERATORS[-1]


def using_accelerator(acc: Accelerator | None):
    """Within this block the model offers its CPU inference forwards to ``acc`` (None: to nobody)."""
    return _pushed(_ACCELERATORS, acc)
