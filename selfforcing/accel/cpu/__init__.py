"""CPU acceleration for float32 streaming inference, opt-in: :func:`timed_kernel_choice`.

Within that block the model (:mod:`selfforcing.models.wan`) offers its no-grad float32 CPU forwards to
:class:`CpuAccelerator`, which runs them

* in C++ (:mod:`.native`: patch embedding, blocks and head with the ops between the matmuls fused), where that path
  supports the forward and the extension builds (``SELFFORCING_CPU_BLOCKS=auto|native|python``);
* otherwise through the model's own blocks, with the faster FFN kernel for each shape timed once per process
  (:mod:`.ffn`, ``SELFFORCING_CPU_FFN=auto|onednn|feature_major``).

Both compute the model's function to float rounding, not bit for bit, and a timing may pick either kernel, so two
processes may differ in the last bits: streaming inference and the benchmarks opt in for speed; training does not,
so that a run resumed after a kill equals a straight run bit for bit. Its measured gain is in docs/performance.md.
"""

from __future__ import annotations

from ...models.wan.runtime import accelerator, using_accelerator
from . import ffn, native
from .timing import chosen_paths, fastest_name

__all__ = ["CpuAccelerator", "chosen_paths", "fastest_name", "timed_choice_enabled", "timed_kernel_choice"]


class CpuAccelerator:
    """The model's accelerator hook (:class:`~selfforcing.models.wan.runtime.Accelerator`) for float32 CPU
    inference."""

    def forward(self, model, plan):
        return native.forward(model, plan)

    def feed_forward(self, module, x):
        return ffn.feed_forward(module, x)


_CPU = CpuAccelerator()


def timed_kernel_choice():
    """Within this block the model runs with :class:`CpuAccelerator` (and may choose between equivalent kernels by
    timing them, :func:`fastest_name`)."""
    return using_accelerator(_CPU)


def timed_choice_enabled() -> bool:
    """Whether the CPU accelerator is installed (see :func:`timed_kernel_choice`)."""
    return isinstance(accelerator(), CpuAccelerator)


def prepare() -> None:
    """Load (or build) the C++ blocks now, not inside the first chunk's latency."""
    native.available()
