"""Per-sample random streams: every random draw of a training step is a function of the sample's global
index, not of the rank that happens to hold it.

That is what makes a 2-rank run equal a 1-rank run with the same global batch, and a resumed run equal an
uninterrupted one: sample i of step s always gets the same timesteps, noise and dropout.
"""

from __future__ import annotations

import torch


class BatchRNG:
    """One ``torch.Generator`` per sample of a batch; draws are stacked into [B, ...] tensors on ``device``."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, fn, shape) -> torch.Tensor:
        return torch.stack([fn(tuple(shape), g) for g in self.generators]).to(self.device)

    def randn(self, shape) -> torch.Tensor:
        """Standard normal [B, *shape] (float32)."""
        return self._stack(lambda s, g: torch.randn(s, generator=g), shape)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"BatchRNG holds {len(self)} samples, tensor has batch {x.shape[0]}")
        return self.randn(x.shape[1:]).to(x.dtype)

    def rand(self, shape=()) -> torch.Tensor:
        """Uniform [0, 1) [B, *shape] (float64)."""
        return self._stack(lambda s, g: torch.rand(s, generator=g, dtype=torch.float64), shape)

    def randint(self, high: int, shape=()) -> torch.Tensor:
        """Uniform integers in [0, high), [B, *shape]."""
        return self._stack(lambda s, g: torch.randint(0, high, s, generator=g), shape)
