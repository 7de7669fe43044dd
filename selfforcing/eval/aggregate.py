"""The statistics of an evaluation: per-sample records (features, pixel stats, per-window adherence and flip rate,
written by :mod:`.runner`) turned into the rows and per-window curves of one method at one length, each with a 95%
percentile bootstrap interval over the samples.

Every statistic is computed on the N samples and on ``bootstrap`` resamples of them (the same resampled index sets
for the own rollout and the GT cache, so gaps are paired); intervals are the 2.5 / 97.5 percentiles. The Frechet
distances use per-sample sufficient statistics (see :class:`_WindowFD`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .metrics import error_accumulation_slope

_STATS = ("brightness", "contrast", "saturation")


def metric_windows(num_frames: int, window: int) -> list[tuple[int, int]]:
    """The metric windows [start, end) of ``window`` pixel frames covering ``num_frames`` (the last one shorter)."""
    return [(s, min(s + window, num_frames)) for s in range(0, num_frames, window)]


def _weighted_nanmean(values: np.ndarray, counts: np.ndarray, all_columns: bool = False) -> np.ndarray:
    """values [n, W] (NaN = undefined), counts [R, n] -> per resample the count-weighted mean over samples of
    each column [R, W], or over all finite entries [R] (``all_columns``)."""
    ok = np.isfinite(values)
    v = np.where(ok, values, 0.0)
    if all_columns:
        num, den = counts @ v.sum(1), counts @ ok.sum(1)
    else:
        num, den = counts @ v, counts @ ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


class _WindowFD:
    """Frechet distance of generated features against a fixed real reference, per window, for many resamples.

    Same formula as :func:`selfforcing.eval.metrics.frechet_distance` (tested equal), arranged for speed: the
    reference's mean, covariance and its square root are computed once per window, so
    Tr((S_g S_r)^{1/2}) = sum sqrt(eig(sqrt(S_r) S_g sqrt(S_r))) costs one symmetric eigenvalue call; the
    generated side's mean and (unbiased) covariance for a resample with sample counts c_i come from
    per-sample sums over the window's frames: N = sum c_i F_w, mu = sum c_i s1_i / N,
    S = (sum c_i s2_i - N mu mu^T) / (N - 1)."""

    def __init__(self, ref_features: torch.Tensor, windows: list[tuple[int, int]]) -> None:
        self.windows = windows
        self.ref = []
        for s, e in windows:
            x = ref_features[:, s:e].reshape(-1, ref_features.shape[-1]).double()
            mu, cov = x.mean(0), torch.cov(x.T).reshape(x.shape[1], -1)
            w, v = np.linalg.eigh(cov.numpy())
            sqrt = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
            self.ref.append((mu.numpy(), np.trace(cov.numpy()), sqrt))

    def curves(self, feats: torch.Tensor, counts: np.ndarray) -> np.ndarray:
        """feats float64 [n, F, D], counts [R, n] -> FD [R, W]."""
        out = np.zeros((counts.shape[0], len(self.windows)))
        for j, ((s, e), (mu_r, tr_r, sqrt_r)) in enumerate(zip(self.windows, self.ref)):
            x = feats[:, s:e].numpy()  # [n, f, D]
            s1 = x.sum(1)  # [n, D]
            s2 = np.einsum("nfd,nfe->nde", x, x)  # [n, D, D]
            f = x.shape[1]
            for r, c in enumerate(counts):
                big_n = c.sum() * f
                if big_n < 2:
                    out[r, j] = np.nan
                    continue
                mu = c @ s1 / big_n
                cov = (np.tensordot(c, s2, 1) - big_n * np.outer(mu, mu)) / (big_n - 1)
                m = sqrt_r @ cov @ sqrt_r
                lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
                fd = ((mu - mu_r) ** 2).sum() + np.trace(cov) + tr_r - 2 * np.sqrt(lam).sum()
                out[r, j] = max(float(fd), 0.0)
        return out




def bootstrap_counts(n: int, bootstrap: int, seed: int) -> np.ndarray:
    """Sample counts [R+1, n] (float64): row 0 counts each of the n samples once, rows 1..R are ``bootstrap``
    resamples with replacement drawn from ``seed`` (none when n = 1)."""
    rng = np.random.default_rng(seed)
    idx_sets = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(max(bootstrap, 0) if n > 1 else 0)]
    return np.stack([np.bincount(ix, minlength=n) for ix in idx_sets]).astype(np.float64)


def _stacked(sel: list[dict]) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """The records' features float64 [n, F, D], pixel stats [n, F, 3], adherence [n, W] and flip rates [n, W]."""
    feats = torch.stack([r["features"] for r in sel]).double()
    stats = torch.stack([r["stats"] for r in sel]).double().numpy()
    adh = torch.stack([r["adherence"] for r in sel]).double().numpy()
    flips = torch.stack([r["flips"] for r in sel]).double().numpy()
    return feats, stats, adh, flips


def _curves(feats, stats, adh, flips, counts: np.ndarray, fd: _WindowFD, ref_mean: torch.Tensor,
            wins: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per resample and window [R+1, W]: FD, |pixel stat - real mean| per stat, adherence and flip rate."""
    w = counts / counts.sum(1, keepdims=True)  # [R+1, n] weights of each resample
    curves = {"fd": fd.curves(feats, counts)}  # [R+1, W]
    for k, st in enumerate(_STATS):
        per_frame = np.abs(w @ stats[:, :, k] - float(ref_mean[k]))  # [R+1, F]
        curves[f"{st}_drift"] = np.stack([per_frame[:, s:e].mean(1) for s, e in wins], 1)
    curves["adherence"] = _weighted_nanmean(adh, counts)
    curves["flip_rate"] = _weighted_nanmean(flips, counts)
    return curves


def _scalars(curves: dict[str, np.ndarray], stats, adh, flips, counts: np.ndarray, ref_mean: torch.Tensor,
             window: int) -> dict[str, np.ndarray]:
    """Per resample [R+1]: the curves' means, the FD slope per pixel frame, adherence (all windows and the first),
    flip rate and the pixel drift slope (per sample: slope over frames of the summed |stats - real mean|)."""
    n, nf = stats.shape[:2]
    w = counts / counts.sum(1, keepdims=True)  # [R+1, n] weights of each resample
    dev = np.abs(stats - ref_mean.numpy()).sum(-1)  # [n, F]
    per_sample_slope = (np.array([error_accumulation_slope(row) for row in dev]) if nf >= 2
                        else np.full(n, np.nan))
    scal = {
        "fd": curves["fd"].mean(1),
        "fd_slope": (np.array([error_accumulation_slope(c) / window for c in curves["fd"]])
                     if curves["fd"].shape[1] >= 2 else np.full(counts.shape[0], np.nan)),
        "adherence": _weighted_nanmean(adh, counts, all_columns=True),
        "adherence_first": curves["adherence"][:, 0],
        "flip_rate": _weighted_nanmean(flips, counts, all_columns=True),
        "drift_slope": w @ per_sample_slope,
    }
    for st in _STATS:
        scal[f"{st}_drift"] = curves[f"{st}_drift"].mean(1)
    return scal


def _summarise(values: np.ndarray) -> tuple[float | None, list | None]:
    """values [R+1] -> (the samples' value, [2.5, 97.5] percentiles of the finite resamples), None when undefined."""
    v = float(values[0])
    boots = values[1:][np.isfinite(values[1:])]
    ci = [float(x) for x in np.percentile(boots, [2.5, 97.5])] if len(boots) >= 2 else None
    return (v if math.isfinite(v) else None), (ci if math.isfinite(v) else None)


def _metric_rows(name: str, length: int, n: int, own: dict, gt: dict | None) -> list[dict]:
    """One row per scalar metric: own rollout, and with a GT-cache run ``<m>_gt_cache`` and ``<m>_gap``."""
    rows = []
    for metric in own["scalars"]:
        series = [(metric, own["scalars"][metric], "self")]
        if gt is not None:
            series += [(f"{metric}_gt_cache", gt["scalars"][metric], "gt_cache"),
                       (f"{metric}_gap", own["scalars"][metric] - gt["scalars"][metric], "gap")]
        for label, values, context in series:
            mean, ci = _summarise(values)
            rows.append({"method": name, "length": length, "metric": label, "mean": mean, "ci": ci, "n": n,
                         "context": context})
    return rows


def _curve_rows(name: str, length: int, centres: list[float], own: dict, gt: dict | None) -> list[dict]:
    """One curve per (context, metric): mean and interval per window, against the window centres."""
    curves = []
    for context, d in (("self", own), ("gt_cache", gt)):
        if d is None:
            continue
        for metric, values in d["curves"].items():
            lo_hi = [_summarise(values[:, j]) for j in range(values.shape[1])]
            curves.append({"method": name, "length": length, "metric": metric, "context": context,
                           "frames": centres, "mean": [m for m, _ in lo_hi],
                           "ci_lo": [ci[0] if ci else m for m, ci in lo_hi],
                           "ci_hi": [ci[1] if ci else m for m, ci in lo_hi]})
    return curves


def aggregate(name: str, length: int, recs: list[dict], ref: dict, *, window: int, bootstrap: int,
              seed: int) -> tuple[list[dict], list[dict]]:
    """Rows and per-window curves of one method at one length (see the module doc).

    ``recs``: the N per-sample records (``features`` [F, D], ``stats`` [F, 3], ``adherence`` / ``flips`` [W],
    optionally ``gt``: the same for the GT-cache run); ``ref``: the real clips' ``features`` [N_r, F, D] and
    ``stats`` [N_r, F, 3]; ``window``: pixel frames per metric window; ``seed`` draws the resamples."""
    n = len(recs)
    wins = metric_windows(recs[0]["features"].shape[0], window)
    ref_mean = ref["stats"].double().mean((0, 1))  # [3]
    counts = bootstrap_counts(n, bootstrap, seed)  # [R+1, n]
    fd = _WindowFD(ref["features"], wins)

    def stats_of(kind: str) -> dict | None:
        sel = [r if kind == "self" else r.get("gt") for r in recs]
        if any(r is None for r in sel):
            return None
        feats, stats, adh, flips = _stacked(sel)
        curves = _curves(feats, stats, adh, flips, counts, fd, ref_mean, wins)
        return {"curves": curves, "scalars": _scalars(curves, stats, adh, flips, counts, ref_mean, window)}

    own, gt = stats_of("self"), stats_of("gt")
    centres = [(s + e - 1) / 2 for s, e in wins]
    return _metric_rows(name, length, n, own, gt), _curve_rows(name, length, centres, own, gt)
