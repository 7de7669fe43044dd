"""Evaluation for Moving-Digits video models: a shipped MNIST digit classifier (:mod:`.digit_classifier`)
and video metrics built on it (:mod:`.metrics`: Frechet distance of classifier features, per-window drift,
temporal flip rate, pixel statistics drift, error-accumulation slope, prompt adherence).

Names are re-exported lazily so ``python -m selfforcing.eval.digit_classifier`` runs without the module
being imported twice."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DigitClassifier": "digit_classifier", "load_digit_classifier": "digit_classifier",
    "train_digit_classifier": "digit_classifier",
    "detect_digits": "metrics", "error_accumulation_slope": "metrics", "frame_features": "metrics",
    "frechet_distance": "metrics", "frechet_per_window": "metrics", "pixel_stats": "metrics",
    "pixel_stats_drift": "metrics", "prompt_adherence": "metrics", "temporal_flip_rate": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'selfforcing.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"selfforcing.eval.{_EXPORTS[name]}"), name)
