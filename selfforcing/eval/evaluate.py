"""Evaluate video generators on Moving-Digits over long rollouts: quality, prompt adherence and drift per time
window, and the train-test gap (exposure bias) of causal models.

For every method (a checkpoint with a sampler) and every length (a multiple of the training length), N videos
are generated from Moving-Digits test captions, sample i with prompt i mod P and its own seed (``seed + i``),
several seeds batched together. Every window of ``window`` pixel frames is scored with :mod:`.metrics`:

* ``fd`` -- Frechet distance of digit-classifier features against real test clips of the same length (pooled
  over the window's frames and the N samples), its mean over windows, and ``fd_slope`` (least-squares slope of
  the per-window FD per pixel frame: error accumulation);
* ``adherence`` -- :func:`prompt_adherence` per window (``adherence_first``: the first window only, where the
  captioned initial direction applies; later windows also count bounces, so real clips score < 1 there too);
* ``flip_rate`` -- :func:`temporal_flip_rate` per window (pairs of consecutive frames, including the one
  crossing into the window);
* ``brightness_drift`` / ``contrast_drift`` / ``saturation_drift`` -- :func:`pixel_stats_drift` against the
  real clips, and ``drift_slope`` (per sample: slope over frames of the summed |stats - real mean|).

The train-test gap: a causal model is also run with its KV cache holding **ground-truth** frames (the real
test clip whose caption is the prompt, encoded by the autoencoder and cached chunk by chunk at t = 0, i.e. the
teacher-forced context of training) instead of its own rollout. Each chunk is then the model's prediction from
real context, with the same noise and prompt as its own rollout. Metrics of those videos are ``<m>_gt_cache``
and the differences ``<m>_gap`` = own rollout minus GT cache (paired over samples).

Confidence intervals: 95% percentile bootstrap over the N samples (paired for gaps; the real reference fixed).

Samplers (the library's, :data:`selfforcing.sampling.SAMPLERS`): ``few-step`` (Algorithm 2 through a rolling
KV cache: Self Forcing, CausVid, ODE init), ``many-step`` (Euler with CFG chunk by chunk, separate conditional /
unconditional caches: teacher forcing, diffusion forcing), ``bidirectional`` (the teacher: Euler with CFG over the
training length; longer videos by a sliding window that keeps the last frames as known context, re-noised to each
step's level as in replacement-based inpainting, and generates ``bidirectional_stride`` new frames per window; no
KV cache, so no GT-cache gap).

Resume: each (method, length, seed) result is a small file under ``out_dir/cache/`` written atomically as soon
as its batch is done, keyed by everything that determines it (the checkpoint files' content included); a re-run
loads those and generates only what is missing.

The parts: :mod:`.specs` (what to run: methods, lengths, settings), :mod:`.runner` (running it with its result
cache), :mod:`.aggregate` (the statistics) and :mod:`.report` (plots, ``results.json``, ``report.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .runner import Evaluator
from .specs import REAL, EvalSettings, MethodSpec, load_method_specs, parse_checkpoint_arg, parse_lengths

__all__ = ["REAL", "EvalSettings", "Evaluator", "MethodSpec", "evaluate", "load_method_specs", "parse_checkpoint_arg",
           "parse_lengths"]


def evaluate(methods: Sequence[MethodSpec], settings: EvalSettings, log: Callable[[str], None] | None = None) -> dict:
    """Run an evaluation (see the module doc) and write ``results.json``, ``report.md`` and the PNGs."""
    return Evaluator(methods, settings, log=log).run()
