"""Video metrics for Moving-Digits models, built on the shipped digit classifier.

All functions take videos as float [B, F, 3, H, W] in [-1, 1] (H = W = 64 for Moving-Digits; any H, W >= 28
works). Frames are reduced to gray by averaging the 3 channels (Moving-Digits is gray: the channels are equal).

* :func:`frame_features` -- classifier features [B, F, D] of whole frames (downsampled to 28x28).
* :func:`frechet_distance`, :func:`frechet_per_window` -- Frechet distance of feature Gaussians, overall or
  per window of frames (drift over time).
* :func:`detect_digits` -- locate and classify up to K digits per frame (sliding 28x28 window sums).
* :func:`temporal_flip_rate` -- how often the set of detected digit labels changes between consecutive frames.
* :func:`pixel_stats`, :func:`pixel_stats_drift` -- brightness / contrast / saturation per frame and their
  deviation from a reference.
* :func:`error_accumulation_slope` -- least-squares slope of a per-frame metric.
* :func:`prompt_adherence` -- are the captioned digits present and moving in the captioned directions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfforcing.data.moving_digits import DIGIT_SIZE, direction_of, parse_caption
from selfforcing.eval.digit_classifier import load_digit_classifier

_CHUNK = 1024  # frames per classifier call
_BOX = 20  # MNIST digits lie in the central 20x20 box of their 28x28 image


def _check_videos(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"{name} must be a float tensor [B, F, 3, H, W] in [-1, 1], got {shape}")
    if videos.shape[-1] < DIGIT_SIZE or videos.shape[-2] < DIGIT_SIZE:
        raise ValueError(f"{name} frames must be at least {DIGIT_SIZE}x{DIGIT_SIZE}, got {tuple(videos.shape[-2:])}")
    if videos.shape[0] < 1 or videos.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one clip and one frame, got {tuple(videos.shape)}")
    return videos.detach().float()


def _model(model):
    return load_digit_classifier() if model is None else model


@torch.no_grad()
def frame_features(videos: torch.Tensor, model=None) -> torch.Tensor:
    """Classifier features float [B, F, D] (D = 64) of every frame of ``videos`` [B, F, 3, H, W].

    Each whole frame is made gray (channel mean) and downsampled H x W -> 28 x 28 with antialiased bilinear
    interpolation (``F.interpolate(..., antialias=True)``), then embedded by the classifier's penultimate
    layer. This is the simplest honest choice: no digit localisation that a bad generator could fool; the
    digits appear at ~28/64 of their training scale, so the features describe the frame's layout and stroke
    statistics rather than a confident digit identity. Values stay in [-1, 1] (background -1).
    """
    videos = _check_videos(videos)
    b, f = videos.shape[:2]
    gray = videos.mean(2).reshape(b * f, 1, *videos.shape[-2:])
    model = _model(model)
    out = []
    for i in range(0, b * f, _CHUNK):
        x = F.interpolate(gray[i:i + _CHUNK], size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
        out.append(model.features(x.clamp(-1, 1)))
    return torch.cat(out).reshape(b, f, -1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a [N, D] and b [M, D] (N, M >= 2), in float64:

        FD = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}),

    S the unbiased covariances. Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i), lambda the eigenvalues of the
    symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a) (same spectrum as S_a S_b), clamped at 0; sqrt(S_a) by
    eigendecomposition of S_a (eigenvalues clamped at 0). No scipy. Tiny negative round-off is clamped to 0.
    """
    a = torch.as_tensor(feats_a).detach().to(torch.float64)
    b = torch.as_tensor(feats_b).detach().to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = sqrt_a @ s_b @ sqrt_a
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    fd = (mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * lam.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_per_window(videos_a: torch.Tensor, videos_b: torch.Tensor, window: int, model=None) -> list[float]:
    """FD between the frames of a and b in each window [0, w), [w, 2w), ... of frame indices (all clips of a
    window pooled: B * w feature vectors per side), so drift over time shows. Windows run over the frames both
    sides have (min(F_a, F_b)); the last window may be shorter. Returns one float per window."""
    if int(window) < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    fa, fb = frame_features(videos_a, model), frame_features(videos_b, model)
    n = min(fa.shape[1], fb.shape[1])
    out = []
    for s in range(0, n, int(window)):
        e = min(s + int(window), n)
        out.append(frechet_distance(fa[:, s:e].reshape(-1, fa.shape[-1]), fb[:, s:e].reshape(-1, fb.shape[-1])))
    return out


def _crops(img: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """img [N, H, W] (already padded), top/left int64 [N] -> crops [N, size, size]."""
    n = img.shape[0]
    rows = top[:, None] + torch.arange(size)
    cols = left[:, None] + torch.arange(size)
    return img[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@torch.no_grad()
def detect_digits(frames: torch.Tensor, max_digits: int = 3, min_mass: float = 25.0, model=None) -> dict:
    """Locate and classify up to ``max_digits`` digits in each frame of ``frames`` float [N, 3, H, W] in [-1, 1].

    Greedy, per round k: g = (gray + 1) / 2 in [0, 1]; the 20x20 window with the largest sum of g (sliding
    sum, ``avg_pool2d`` stride 1; MNIST digits lie in the central 20x20 box of their image) is found; its
    mass is that sum (a real MNIST digit has ~100). The centroid c = sum(p * g) / sum(g) of the pixels in
    that window locates the digit (MNIST digits are centred on their centre of mass); the 20x20 box around c
    is kept (everything else zeroed, so a neighbouring digit does not leak in), cropped to 28x28 centred at c
    and classified; then that box is zeroed before the next round. A detection is valid when its mass >=
    ``min_mass``. Overlapping digits can merge into one detection (no detector separates them reliably).

    Returns {"labels": int64 [N, K] (-1 where invalid), "probs": float [N, K], "centers": float [N, K, 2]
    (x, y of the centroid in pixels), "mass": float [N, K], "valid": bool [N, K]}.
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or min(frames.shape[-2:]) < DIGIT_SIZE:
        raise ValueError(f"frames must be [N, 3, H, W] with H, W >= {DIGIT_SIZE}, got {tuple(frames.shape)}")
    model = _model(model)
    g = ((frames.detach().float().mean(1) + 1) / 2).clamp(0, 1).clone()  # [N, H, W]
    n, h, w = g.shape
    ds, half, box = DIGIT_SIZE, DIGIT_SIZE // 2, _BOX
    labels, probs, centers, masses = [], [], [], []
    offs = torch.arange(box, dtype=torch.float32)
    r, c = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    for _ in range(max_digits):
        sums = F.avg_pool2d(g[:, None], box, stride=1)[:, 0] * (box * box)  # [N, H-19, W-19]
        mass, arg = sums.flatten(1).max(1)
        wy, wx = arg // sums.shape[-1], arg % sums.shape[-1]
        win = _crops(g, wy, wx, box)  # [N, 20, 20]
        tot = win.sum((1, 2)).clamp_min(1e-6)
        cy = wy.float() + (win.sum(2) * offs).sum(1) / tot
        cx = wx.float() + (win.sum(1) * offs).sum(1) / tot
        cyr, cxr = cy.round().long(), cx.round().long()
        # keep only the 20x20 box around the centroid (where an MNIST digit lies), crop 28x28 around it
        keep = ((r >= cyr[:, None, None] - box // 2) & (r < cyr[:, None, None] + box // 2)
                & (c >= cxr[:, None, None] - box // 2) & (c < cxr[:, None, None] + box // 2))
        padded = F.pad(g * keep, (half,) * 4)
        crop = _crops(padded, cyr, cxr, ds)  # [N, 28, 28] in [0, 1] (top-left = c - 14 in unpadded coords)
        p = torch.cat([model(crop[i:i + _CHUNK, None] * 2 - 1).softmax(-1) for i in range(0, n, _CHUNK)])
        pr, lab = p.max(-1)
        labels.append(lab), probs.append(pr), masses.append(mass)
        centers.append(torch.stack([cx, cy], -1))
        g = g.masked_fill(keep, 0.0)  # suppress this digit before the next round
    mass = torch.stack(masses, 1)
    valid = mass >= min_mass
    lab = torch.stack(labels, 1).masked_fill(~valid, -1)
    return {"labels": lab, "probs": torch.stack(probs, 1) * valid, "centers": torch.stack(centers, 1),
            "mass": mass, "valid": valid}


@torch.no_grad()
def one_digit_reads(frames: torch.Tensor, digits: torch.Tensor, model=None) -> dict:
    """Per frame, whether the digit classifier reads a digit in one-digit ``frames`` float [N, 3, H, W] in [-1, 1],
    against the asked-for ``digits`` int [N] (:func:`detect_digits` with one digit):
    ``confident`` bool [N]: a valid detection with probability > 0.9; ``captioned`` bool [N]: the detected digit is
    the asked-for one with probability > 0.5; ``probs`` float [N]: the detection's probability (0 where none).
    The means of the first two are the digit rates of a generator on one-digit prompts."""
    det = detect_digits(frames, max_digits=1, model=model)
    prob, label = det["probs"][:, 0], det["labels"][:, 0]
    return {"confident": (prob > 0.9) & det["valid"][:, 0], "captioned": (label == digits) & (prob > 0.5),
            "probs": prob}


@torch.no_grad()
def temporal_flip_rate(videos: torch.Tensor, max_digits: int = 3, reduce: bool = True, model=None):
    """Temporal-consistency proxy: the fraction of consecutive frame pairs (f, f+1) whose multiset of detected
    digit labels (:func:`detect_digits`, sorted valid labels) differs. A real clip keeps its digits, so its
    rate is ~0 (non-zero only when overlapping digits confuse the detector); frames shuffled across clips flip
    almost always. Returns the mean over clips (float), or float [B] per clip if ``reduce`` is False.
    Needs F >= 2."""
    videos = _check_videos(videos)
    b, f = videos.shape[:2]
    if f < 2:
        raise ValueError(f"temporal_flip_rate needs at least 2 frames, got {f}")
    det = detect_digits(videos.reshape(b * f, *videos.shape[2:]), max_digits=max_digits, model=model)
    labels = det["labels"].reshape(b, f, -1).sort(-1).values  # invalid (-1) sort first, consistently
    flips = (labels[:, 1:] != labels[:, :-1]).any(-1).float()  # [B, F-1]
    per_clip = flips.mean(1)
    return float(per_clip.mean()) if reduce else per_clip


def pixel_stats(videos: torch.Tensor, saturation_eps: float = 0.05) -> torch.Tensor:
    """Per frame [brightness, contrast, saturation] -> float [B, F, 3]: brightness = mean pixel value,
    contrast = pixel std, saturation = fraction of values with |x| >= 1 - ``saturation_eps`` (at either
    extreme), all over the frame's 3 x H x W values in [-1, 1] units."""
    videos = _check_videos(videos)
    flat = videos.flatten(2)
    sat = (flat.abs() >= 1 - saturation_eps).float().mean(-1)
    return torch.stack([flat.mean(-1), flat.std(-1, unbiased=False), sat], -1)


def pixel_stats_drift(videos: torch.Tensor, reference: torch.Tensor, saturation_eps: float = 0.05) -> torch.Tensor:
    """float [F, 3]: |mean_b pixel_stats(videos)[b, f] - mean_{b, f} pixel_stats(reference)[b, f]| per frame
    index f -- how far each frame's brightness / contrast / saturation (averaged over the clips) strays from
    the reference's overall mean."""
    s = pixel_stats(videos, saturation_eps).mean(0)
    ref = pixel_stats(reference, saturation_eps).mean((0, 1))
    return (s - ref).abs()


def error_accumulation_slope(values_per_frame) -> float:
    """Least-squares slope of values v_f against frame index f = 0..F-1:
    slope = sum (f - mean f)(v_f - mean v) / sum (f - mean f)^2 (float64). Needs F >= 2 finite values."""
    v = torch.as_tensor(values_per_frame, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ValueError(f"need at least 2 per-frame values for a slope, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("per-frame values contain NaN or inf")
    t = torch.arange(v.numel(), dtype=torch.float64)
    tc = t - t.mean()
    return float((tc * (v - v.mean())).sum() / tc.square().sum())


def _estimate_direction(track: np.ndarray) -> str | None:
    """Initial compass direction of a centroid track float [T, 2] (NaN rows = not found), robust to wall
    bounces: per axis, speed = mean |step| over consecutive found frames (a bounce only flips a component's
    sign), sign = sign of the displacement over the first two found steps (else of the first non-zero step).
    None when nothing moves (speed < 0.25 px/frame on both axes) or fewer than 2 consecutive found frames."""
    ok = ~np.isnan(track[:, 0])
    steps = [track[i + 1] - track[i] for i in range(len(track) - 1) if ok[i] and ok[i + 1]]
    if not steps:
        return None
    steps = np.stack(steps)
    speed = np.abs(steps).mean(0)
    if speed.max() < 0.25:
        return None
    vec = np.zeros(2)
    first = steps[:2].sum(0)
    for a in range(2):
        s = np.sign(first[a])
        if s == 0:
            nz = steps[:, a][np.abs(steps[:, a]) > 0.5]
            s = np.sign(nz[0]) if len(nz) else 0.0
        vec[a] = s * speed[a]
    if np.abs(vec).max() == 0:
        return None
    return direction_of(vec)


@torch.no_grad()
def prompt_adherence(videos: torch.Tensor, captions: list[str], max_digits: int = 3, max_jump: float = 10.0,
                     model=None) -> torch.Tensor:
    """Per-clip score float [B] in [0, 1]: does each clip show its caption's digits moving as captioned?

    Digits are found per frame with :func:`detect_digits`. For each caption part (digit d, direction):
    the track starts at the first frame holding a detection labelled d (an unused one, highest probability)
    and follows, frame to frame, the valid detection nearest to the last found centroid (within ``max_jump``
    px; otherwise the frame counts as not found). present = some detection is labelled d in at least half of
    the F frames; moves = present and the track's estimated initial direction (per-axis mean |step|
    and initial sign, so wall bounces do not break it; see ``_estimate_direction``) equals the captioned
    direction (:func:`direction_of` naming). part score = (present + moves) / 2; clip score = mean over parts.
    """
    videos = _check_videos(videos)
    b, f = videos.shape[:2]
    if len(captions) != b:
        raise ValueError(f"need one caption per clip: {b} clips, {len(captions)} captions")
    parsed = [parse_caption(c) for c in captions]
    det = detect_digits(videos.reshape(b * f, *videos.shape[2:]), max_digits=max_digits, model=model)
    labels = det["labels"].reshape(b, f, -1).numpy()
    probs = det["probs"].reshape(b, f, -1).numpy()
    centers = det["centers"].reshape(b, f, -1, 2).numpy()
    scores = torch.zeros(b)
    for i, parts in enumerate(parsed):
        used = set()  # (frame, slot) taken as a track start by an earlier part
        part_scores = []
        for digit, direction in parts:
            start = None
            for fr in range(f):
                cand = [(probs[i, fr, k], k) for k in range(labels.shape[2])
                        if labels[i, fr, k] == digit and (fr, k) not in used]
                if cand:
                    start = (fr, max(cand)[1])
                    break
            if start is None:
                part_scores.append(0.0)
                continue
            used.add(start)
            fr0, k0 = start
            track = np.full((f, 2), np.nan)
            track[fr0] = centers[i, fr0, k0]
            last = track[fr0]
            for fr in range(fr0 + 1, f):
                valid = labels[i, fr] >= 0
                if not valid.any():
                    continue
                dist = np.linalg.norm(centers[i, fr] - last, axis=-1)
                dist[~valid] = np.inf
                k = int(dist.argmin())
                if dist[k] > max_jump:
                    continue
                track[fr], last = centers[i, fr, k], centers[i, fr, k]
            present = int((labels[i] == digit).any(-1).sum()) >= f / 2
            moves = present and _estimate_direction(track) == direction
            part_scores.append((float(present) + float(moves)) / 2)
        scores[i] = float(np.mean(part_scores))
    return scores
