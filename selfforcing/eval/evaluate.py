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

Samplers: ``few-step`` (Algorithm 2 through a rolling KV cache: Self Forcing, CausVid, ODE init),
``many-step`` (Euler with CFG chunk by chunk, separate conditional / unconditional caches: teacher forcing,
diffusion forcing), ``bidirectional`` (the teacher: Euler with CFG over the training length; longer videos by
a sliding window that keeps the last frames as known context, re-noised to each step's level as in
replacement-based inpainting, and generates ``bidirectional_stride`` new frames per window; no KV cache, so no
GT-cache gap).

Resume: each (method, length, seed) result is a small file under ``out_dir/cache/`` written atomically as soon
as its batch is done, keyed by everything that determines it (checkpoint file times included); a re-run loads
those and generates only what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_text
from ..sampling import SAMPLERS, sample_bidirectional_sliding, sample_causal_many_step, sample_few_step

REAL = "real"  # the built-in baseline: held-out real clips scored like a method
_CACHE_VERSION = 2  # 2: checkpoints keyed by content, not by path and mtime
_STATS = ("brightness", "contrast", "saturation")
_METHOD_KEYS = {"name", "checkpoint", "sampler", "preset", "use_ema", "num_steps", "guidance_scale", "shift",
                "steps"}


# ------------------------------------------------------------------------------------------------- specs
@dataclass
class MethodSpec:
    """One method: a name, a generator checkpoint and the sampler that runs it (per-method overrides of the
    sampling settings are optional: None takes the evaluation's)."""

    name: str
    checkpoint: str
    sampler: str = "few-step"
    preset: str = "tiny"
    use_ema: bool = False
    num_steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    steps: list[float] | None = None  # nominal few-step list (warped with the shift)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\:=") \
                or self.name.strip() != self.name:
            raise ValueError(f"method name must be a non-empty string without '/', '\\', ':', '=' or surrounding "
                             f"spaces, got {self.name!r}")
        if self.name == REAL:
            raise ValueError(f"method name {REAL!r} is reserved for the real-clip baseline")
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"method {self.name!r}: checkpoint must be a path, got {self.checkpoint!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"method {self.name!r}: unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"method {self.name!r}: num_steps must be an integer >= 1, got {self.num_steps!r}")


def parse_checkpoint_arg(text: str) -> MethodSpec:
    """``NAME=PATH`` or ``NAME=PATH:SAMPLER`` -> :class:`MethodSpec` (ValueError naming what is wrong)."""
    name, sep, rest = str(text).partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"--checkpoint must be NAME=PATH or NAME=PATH:SAMPLER, got {text!r}")
    path, sampler = rest, "few-step"
    head, colon, tail = rest.rpartition(":")
    if colon and "/" not in tail and "\\" not in tail and head:
        path, sampler = head, tail
        if sampler not in SAMPLERS:
            raise ValueError(f"--checkpoint {text!r}: unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    return MethodSpec(name=name.strip(), checkpoint=path.strip(), sampler=sampler)


def load_method_specs(path: str) -> list[MethodSpec]:
    """Methods from a JSON or YAML file: a list of {name, checkpoint, sampler?, num_steps?, guidance_scale?,
    shift?, steps?, preset?, use_ema?} or {"methods": [...]}; relative checkpoint paths are relative to the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"method spec file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's fault
        raise ValueError(f"{path}: not valid JSON / YAML: {e}") from None
    if isinstance(data, dict) and "methods" in data:
        data = data["methods"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of methods (or {{methods: [...]}})")
    out = []
    base = os.path.dirname(os.path.abspath(path))
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: method {i} must be a mapping, got {type(item).__name__}")
        unknown = set(item) - _METHOD_KEYS
        if unknown:
            raise ValueError(f"{path}: method {i} has unknown keys {sorted(unknown)}; allowed {sorted(_METHOD_KEYS)}")
        if "name" not in item or "checkpoint" not in item:
            raise ValueError(f"{path}: method {i} needs 'name' and 'checkpoint'")
        item = dict(item)
        ck = str(item["checkpoint"])
        item["checkpoint"] = ck if os.path.isabs(ck) else os.path.join(base, ck)
        try:
            out.append(MethodSpec(**item))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: method {i}: {e}") from None
    return out


def parse_lengths(text: str | Sequence[int]) -> list[int]:
    """"1,5,10" -> [1, 5, 10]: positive integer multiples of the training length, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            v = int(str(item).strip())
        except ValueError:
            raise ValueError(f"lengths must be comma-separated integers >= 1 (multiples of the training length), "
                             f"got {text!r}") from None
        if v < 1:
            raise ValueError(f"lengths must be integers >= 1 (multiples of the training length), got {v} in {text!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError("need at least one length")
    return out


@dataclass
class EvalSettings:
    """Everything an evaluation run depends on besides the methods."""

    out_dir: str
    lengths: list[int] = field(default_factory=lambda: [1])
    num_samples: int = 16
    num_prompts: int = 16  # P test clips 0..P-1 (their captions are the prompts and their frames the GT context)
    prompts: list[str] | None = None  # a prompt file instead (then no GT-cache runs: no matching real clips)
    train_frames: int = 12  # pixel frames of the training clips (length 1)
    window: int | None = None  # metric window in pixel frames (default: train_frames)
    seed: int = 0
    batch_size: int = 8
    kv_window: int | None = None  # rolling KV window in latent frames (default: the training length; 0 = global)
    sink_frames: int = 0
    few_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    shift: float | None = None  # None: the training run's timestep_shift (its config.yaml), else 5.0
    num_steps: int = 50
    guidance_scale: float = 3.0
    negative_prompt: str = ""
    bidirectional_stride: int | None = None  # new latent frames per sliding window (default: half the window)
    num_real: int = 64  # real reference clips per length
    gt_cache: bool = True
    real_baseline: bool = True
    bootstrap: int = 200
    autoencoder: str = "moving-digits"
    text_encoder: str = "minilm"
    text_len: int | None = None
    size: int = 64
    num_digits: tuple[int, int] = (1, 2)
    images_per_digit: int | None = None  # the real clips' digit pool (see moving_digits.digit_pool)
    device: str = "cpu"

    def check(self) -> None:
        for name in ("num_samples", "num_prompts", "train_frames", "batch_size", "num_real", "num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.num_real < 2:
            raise ValueError("num_real must be >= 2 (a covariance needs two clips)")
        if self.num_samples < 2:
            raise ValueError("num_samples must be >= 2 (Frechet distance and intervals need two samples)")
        self.lengths = parse_lengths(self.lengths)
        if self.window is not None and self.window < 2:
            raise ValueError(f"window must be >= 2 pixel frames, got {self.window}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt list is empty")


# ------------------------------------------------------------------------------------------------- helpers
def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def _pool_key(images_per_digit: int | None) -> dict:
    """The digit-pool entry of a cache key: absent for the full pool, so caches written before the setting
    existed stay valid."""
    return {} if images_per_digit is None else {"images_per_digit": int(images_per_digit)}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def _checkpoint_stamp(path: str) -> list:
    """[name, size, SHA-256] of the checkpoint's files: what the weights are, not where they lie or when they were
    written, so a retrained checkpoint invalidates cached results while a moved or copied one keeps them."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    else:
        files = [path]
    stats = [(f, os.stat(f)) for f in files]
    return [[os.path.basename(f), st.st_size, _file_sha256(os.path.abspath(f), st.st_mtime_ns, st.st_size)]
            for f, st in stats]


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file, read once per (path, mtime, size) in a process (about 1 s per GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_config(checkpoint: str) -> dict:
    """The training recipe (``config.yaml``) of the run that wrote ``checkpoint`` (in the folder or its parent),
    or {} when there is none."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    for d in (folder, os.path.dirname(os.path.abspath(folder))):
        p = os.path.join(d, "config.yaml")
        if os.path.isfile(p):
            try:
                import yaml

                with open(p, encoding="utf-8") as fh:
                    data = yaml.safe_load(fh)
                return data if isinstance(data, dict) else {}
            except Exception:  # noqa: BLE001 - an unreadable recipe only loses the defaults it would give
                return {}
    return {}


def _windows(num_frames: int, window: int) -> list[tuple[int, int]]:
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


# ------------------------------------------------------------------------------------------------- evaluator
class Evaluator:
    """Runs an evaluation: ``Evaluator(methods, settings).run()`` -> the results dict (also written to disk)."""

    def __init__(self, methods: Sequence[MethodSpec], settings: EvalSettings,
                 log: Callable[[str], None] | None = None) -> None:
        settings.check()
        names = [m.name for m in methods]
        if not methods:
            raise ValueError("need at least one method (--checkpoint NAME=PATH)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names must be unique, repeated: {dup}")
        for m in methods:
            if not os.path.exists(m.checkpoint):
                raise FileNotFoundError(f"method {m.name!r}: checkpoint not found: {m.checkpoint}")
        self.methods, self.s = list(methods), settings
        self.log = log or (lambda msg: None)
        self.window = settings.window or settings.train_frames
        self.generate_calls = 0  # batches generated by this run (tests, progress)
        self._ae = self._text = self._classifier = None
        self._text_cache: dict[str, torch.Tensor] = {}
        self._real: dict[int, dict] = {}
        self._clip_cache: dict[tuple[int, int], dict] = {}
        self.notes: list[str] = []

    # ---------------------------------------------------------------- shared resources
    @property
    def ae(self):
        if self._ae is None:
            from ..autoencoders import get_autoencoder

            self._ae = get_autoencoder(self.s.autoencoder, self.s.device)
        return self._ae

    @property
    def classifier(self):
        if self._classifier is None:
            from .digit_classifier import load_digit_classifier

            self._classifier = load_digit_classifier()
        return self._classifier

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self._text is None:
            from ..text import build_text_encoder

            self._text = build_text_encoder(self.s.text_encoder, self.s.text_len, device=self.s.device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            states = self._text.encode(missing).states
            for p, st in zip(missing, states):
                self._text_cache[p] = st
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.s.device)

    def latent_frames(self, length: int) -> int:
        return length * self.ae.latent_frames(self.s.train_frames)

    def pixel_frames(self, length: int) -> int:
        return self.ae.pixel_frames(self.latent_frames(length))

    def _clip(self, index: int, num_frames: int) -> dict:
        from ..data.moving_digits import render_clip

        key = (index, num_frames)
        if key not in self._clip_cache:
            self._clip_cache[key] = render_clip("test", index, num_frames=num_frames, size=self.s.size,
                                                num_digits=tuple(self.s.num_digits), seed=self.s.seed,
                                                images_per_digit=self.s.images_per_digit)
        return self._clip_cache[key]

    def prompt_of(self, i: int) -> tuple[str, int | None]:
        """(prompt, test clip index or None) of sample i."""
        if self.s.prompts is not None:
            return self.s.prompts[i % len(self.s.prompts)], None
        j = i % self.s.num_prompts
        return self._clip(j, 1)["caption"], j

    # ---------------------------------------------------------------- per-video measurements
    @torch.no_grad()
    def measure(self, videos: torch.Tensor, prompts: list[str]) -> list[dict]:
        """Per-sample records of pixel videos [B, F, 3, H, W]: features, pixel stats, per-window adherence and
        flip rate (the expensive part; everything else is aggregated from these)."""
        from .metrics import frame_features, pixel_stats, prompt_adherence, temporal_flip_rate

        videos = videos.detach().float().cpu().clamp(-1, 1)
        b, f = videos.shape[:2]
        feats = frame_features(videos, self.classifier)
        stats = pixel_stats(videos)
        wins = _windows(f, self.window)
        adh = torch.stack([prompt_adherence(videos[:, s:e], prompts, model=self.classifier) for s, e in wins], 1)
        flips = []
        for s, e in wins:
            s0 = max(s - 1, 0)
            flips.append(temporal_flip_rate(videos[:, s0:e], reduce=False, model=self.classifier)
                         if e - s0 >= 2 else torch.full((b,), float("nan")))
        flips = torch.stack(flips, 1)
        return [{"features": feats[i].clone(), "stats": stats[i].clone(), "adherence": adh[i].clone(),
                 "flips": flips[i].clone()} for i in range(b)]

    def real_reference(self, length: int) -> dict:
        """Features and pixel stats of ``num_real`` real test clips (indices 10**6 + j, disjoint from the
        prompt clips) of this length; cached on disk."""
        if length in self._real:
            return self._real[length]
        nf = self.pixel_frames(length)
        key = _digest({"v": _CACHE_VERSION, "n": self.s.num_real, "frames": nf, "size": self.s.size,
                       "digits": list(self.s.num_digits), "seed": self.s.seed,
                       **_pool_key(self.s.images_per_digit)})
        path = os.path.join(self.s.out_dir, "cache", REAL, f"reference_L{length}_{key}.pt")
        if os.path.isfile(path):
            ref = torch.load(path, weights_only=True)
        else:
            from .metrics import frame_features, pixel_stats

            videos = torch.stack([self._clip(10**6 + j, nf)["video"] for j in range(self.s.num_real)])
            ref = {"features": frame_features(videos, self.classifier), "stats": pixel_stats(videos)}
            atomic_write(path, lambda tmp: torch.save(ref, tmp))
        self._clip_cache.clear()
        self._real[length] = ref
        return ref

    # ---------------------------------------------------------------- generation
    def _method_key(self, m: MethodSpec, length: int) -> dict:
        s = self.s
        method = {k: v for k, v in asdict(m).items() if k != "checkpoint"}  # its content is in the stamp
        return {"v": _CACHE_VERSION, "method": method, "stamp": _checkpoint_stamp(m.checkpoint),
                "length": length, "latent_frames": self.latent_frames(length), "train_frames": s.train_frames,
                "kv_window": self._kv_window(), "sink": s.sink_frames, "shift": self._shift(m),
                "few_steps": m.steps or s.few_steps, "num_steps": m.num_steps or s.num_steps,
                "cfg": s.guidance_scale if m.guidance_scale is None else m.guidance_scale,
                "neg": s.negative_prompt, "stride": self._stride(), "ae": s.autoencoder, "text": s.text_encoder,
                "text_len": s.text_len, "window": self.window, "size": s.size, "digits": list(s.num_digits),
                **_pool_key(s.images_per_digit),
                "prompts": s.prompts, "num_prompts": s.num_prompts if s.prompts is None else None,
                "data_seed": s.seed}

    def _kv_window(self) -> int | None:
        if self.s.kv_window is None:
            return self.ae.latent_frames(self.s.train_frames)
        return self.s.kv_window if self.s.kv_window > 0 else -1

    def _stride(self) -> int:
        w = self.ae.latent_frames(self.s.train_frames)
        return self.s.bidirectional_stride or max(1, w // 2)

    def _shift(self, m: MethodSpec) -> float:
        if m.shift is not None:
            return float(m.shift)
        if self.s.shift is not None:
            return float(self.s.shift)
        from ..pipeline import PipelineSpec, spec_file

        if os.path.isfile(spec_file(m.checkpoint)):  # the trained folder says how it was trained
            return float(PipelineSpec.for_checkpoint(m.checkpoint).shift)
        return float(run_config(m.checkpoint).get("timestep_shift", 5.0))

    def _wants_gt(self, m: MethodSpec) -> bool:
        return self.s.gt_cache and m.sampler != "bidirectional" and self.s.prompts is None

    def _load_model(self, m: MethodSpec):
        from ..models import CausalWanModel

        model = CausalWanModel.from_checkpoint(m.checkpoint, preset=m.preset, use_ema=m.use_ema)
        return model.to(self.s.device).eval()

    @torch.no_grad()
    def generate(self, model, m: MethodSpec, length: int, indices: list[int], gt: bool = False) -> torch.Tensor:
        """Latent videos [B, F', C, h, w] of samples ``indices`` (own rollout, or GT-cache predictions)."""
        from .. import flow
        from ..training.rng import BatchRNG

        self.generate_calls += 1
        s, dev = self.s, self.s.device
        nf = self.latent_frames(length)
        h = w = s.size // self.ae.spatial_compression
        c = model.config.in_channels
        seeds = [s.seed + i for i in indices]
        noise = torch.stack([torch.randn((nf, c, h, w), generator=torch.Generator().manual_seed(sd))
                             for sd in seeds]).to(dev)
        rng = BatchRNG([sd + 7_919 for sd in seeds], dev)  # the re-noising draws (few-step, sliding window)
        prompts = [self.prompt_of(i)[0] for i in indices]
        ctx = self._encode_text(prompts)
        null = self._encode_text([s.negative_prompt] * len(indices))
        cfg = s.guidance_scale if m.guidance_scale is None else m.guidance_scale
        num_steps, shift = m.num_steps or s.num_steps, self._shift(m)
        gt_latents = None
        if gt:
            clips = torch.stack([self._clip(self.prompt_of(i)[1], self.pixel_frames(length))["video"]
                                 for i in indices]).to(dev)
            gt_latents = self.ae.encode(clips)
        window = self._kv_window()
        sink = s.sink_frames if window and window > 0 else 0
        if m.sampler == "few-step":
            steps = flow.denoising_step_list(m.steps or s.few_steps, shift=shift).tolist()
            return sample_few_step(model, noise, ctx, steps, generator=rng, window_frames=window, sink_frames=sink,
                                   cached_latents=gt_latents)
        if m.sampler == "many-step":
            return sample_causal_many_step(model, noise, ctx, block_sizes=model.block_sizes(nf), null_context=null,
                                           num_steps=num_steps, shift=shift, guidance_scale=cfg, window_frames=window,
                                           sink_frames=sink, cached_latents=gt_latents)
        return sample_bidirectional_sliding(model, noise, ctx, null, num_steps=num_steps, shift=shift,
                                            guidance_scale=cfg, window=self.ae.latent_frames(s.train_frames),
                                            stride=self._stride(), generator=rng)

    def _cache_path(self, method: str, length: int, index: int) -> str:
        return os.path.join(self.s.out_dir, "cache", method, f"L{length}", f"seed{self.s.seed + index}.pt")

    def _load_cached(self, path: str, key: str) -> dict | None:
        if not os.path.isfile(path):
            return None
        try:
            rec = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            self.log(f"warning: unreadable cache entry {path}; recomputing it")
            return None
        return rec if rec.get("key") == key else None

    def samples_for(self, m: MethodSpec | None, length: int) -> list[dict]:
        """The N per-sample records of a method (None: the real baseline) at a length: cached ones are loaded,
        the missing ones generated in batches and written as each batch finishes."""
        s = self.s
        name = REAL if m is None else m.name
        if m is None:
            key = _digest({"v": _CACHE_VERSION, "real": True, "frames": self.pixel_frames(length), "size": s.size,
                           "digits": list(s.num_digits), "window": self.window, "data_seed": s.seed,
                           **_pool_key(s.images_per_digit)})
        else:
            key = _digest(self._method_key(m, length))
        want_gt = m is not None and self._wants_gt(m)
        recs: dict[int, dict] = {}
        for i in range(s.num_samples):
            rec = self._load_cached(self._cache_path(name, length, i), key)
            if rec is not None and want_gt and "gt" not in rec:
                rec = None  # computed without the GT-cache run: redo it with
            if rec is not None:
                if not want_gt:
                    rec.pop("gt", None)
                recs[i] = rec
        todo = [i for i in range(s.num_samples) if i not in recs]
        if todo:
            self.log(f"{name} x{length}: {len(todo)} of {s.num_samples} samples to generate "
                     f"({s.num_samples - len(todo)} cached)")
        model = None
        for b0 in range(0, len(todo), s.batch_size):
            batch = todo[b0:b0 + s.batch_size]
            t0 = time.perf_counter()
            if m is None:  # real clips i (their captions): what a perfect generator would score
                clips = [self._clip(i, self.pixel_frames(length)) for i in batch]
                new = self.measure(torch.stack([c["video"] for c in clips]), [c["caption"] for c in clips])
                videos = torch.stack([c["video"] for c in clips])
            else:
                if model is None:
                    model = self._load_model(m)
                prompts = [self.prompt_of(i)[0] for i in batch]
                videos = self.ae.decode(self.generate(model, m, length, batch)).cpu()
                new = self.measure(videos, prompts)
                if want_gt:
                    gt_videos = self.ae.decode(self.generate(model, m, length, batch, gt=True)).cpu()
                    for rec, g in zip(new, self.measure(gt_videos, prompts)):
                        rec["gt"] = g
            for j, (i, rec) in enumerate(zip(batch, new)):
                rec["key"] = key
                if i == 0:  # a preview of the first sample (uint8 gray frames) for the report's contact sheet
                    rec["preview"] = ((videos[j].mean(1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                atomic_write(self._cache_path(name, length, i), lambda tmp, r=rec: torch.save(r, tmp))
                recs[i] = rec
            self.log(f"{name} x{length}: samples {batch[0]}..{batch[-1]} in {time.perf_counter() - t0:.1f} s")
        self._clip_cache.clear()
        return [recs[i] for i in range(s.num_samples)]

    # ---------------------------------------------------------------- aggregation
    def aggregate(self, name: str, length: int, recs: list[dict], ref: dict) -> tuple[list[dict], list[dict]]:
        """Rows and per-window curves of one method at one length.

        Every statistic is computed on the N samples and on ``bootstrap`` resamples of them (the same resampled
        index sets for the own rollout and the GT cache, so gaps are paired); intervals are the 2.5 / 97.5
        percentiles. The Frechet distances use per-sample sufficient statistics (see :class:`_WindowFD`)."""
        from .metrics import error_accumulation_slope

        n = len(recs)
        nf = recs[0]["features"].shape[0]
        wins = _windows(nf, self.window)
        centres = [(s + e - 1) / 2 for s, e in wins]
        ref_mean = ref["stats"].double().mean((0, 1))  # [3]
        rng = np.random.default_rng(int(_digest([name, length])[:8], 16))
        idx_sets = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(max(self.s.bootstrap, 0) if n > 1 else 0)]
        counts = np.stack([np.bincount(ix, minlength=n) for ix in idx_sets]).astype(np.float64)  # [R+1, n]
        fd = _WindowFD(ref["features"], wins)

        def stats_of(kind: str) -> dict | None:
            sel = [r if kind == "self" else r.get("gt") for r in recs]
            if any(r is None for r in sel):
                return None
            feats = torch.stack([r["features"] for r in sel]).double()
            stats = torch.stack([r["stats"] for r in sel]).double().numpy()  # [n, F, 3]
            adh = torch.stack([r["adherence"] for r in sel]).double().numpy()  # [n, W]
            flips = torch.stack([r["flips"] for r in sel]).double().numpy()  # [n, W]
            w = counts / counts.sum(1, keepdims=True)  # [R+1, n] weights of each resample
            curves = {"fd": fd.curves(feats, counts)}  # [R+1, W]
            for k, st in enumerate(_STATS):
                per_frame = np.abs(w @ stats[:, :, k] - float(ref_mean[k]))  # [R+1, F]
                curves[f"{st}_drift"] = np.stack([per_frame[:, s:e].mean(1) for s, e in wins], 1)
            curves["adherence"] = _weighted_nanmean(adh, counts)
            curves["flip_rate"] = _weighted_nanmean(flips, counts)
            dev = np.abs(stats - ref_mean.numpy()).sum(-1)  # [n, F]
            per_sample_slope = (np.array([error_accumulation_slope(row) for row in dev]) if nf >= 2
                                else np.full(n, np.nan))
            scal = {
                "fd": curves["fd"].mean(1),
                "fd_slope": (np.array([error_accumulation_slope(c) / self.window for c in curves["fd"]])
                             if len(wins) >= 2 else np.full(len(idx_sets), np.nan)),
                "adherence": _weighted_nanmean(adh, counts, all_columns=True),
                "adherence_first": curves["adherence"][:, 0],
                "flip_rate": _weighted_nanmean(flips, counts, all_columns=True),
                "drift_slope": w @ per_sample_slope,
            }
            for st in _STATS:
                scal[f"{st}_drift"] = curves[f"{st}_drift"].mean(1)
            return {"curves": curves, "scalars": scal}

        own, gt = stats_of("self"), stats_of("gt")
        rows, curves = [], []

        def summarise(values: np.ndarray) -> tuple[float | None, list | None]:
            v = float(values[0])
            boots = values[1:][np.isfinite(values[1:])]
            ci = [float(x) for x in np.percentile(boots, [2.5, 97.5])] if len(boots) >= 2 else None
            return (v if math.isfinite(v) else None), (ci if math.isfinite(v) else None)

        for metric in own["scalars"]:
            series = [(metric, own["scalars"][metric], "self")]
            if gt is not None:
                series += [(f"{metric}_gt_cache", gt["scalars"][metric], "gt_cache"),
                           (f"{metric}_gap", own["scalars"][metric] - gt["scalars"][metric], "gap")]
            for label, values, context in series:
                mean, ci = summarise(values)
                rows.append({"method": name, "length": length, "metric": label, "mean": mean, "ci": ci, "n": n,
                             "context": context})
        for context, d in (("self", own), ("gt_cache", gt)):
            if d is None:
                continue
            for metric, values in d["curves"].items():
                lo_hi = [summarise(values[:, j]) for j in range(values.shape[1])]
                curves.append({"method": name, "length": length, "metric": metric, "context": context,
                               "frames": centres, "mean": [m for m, _ in lo_hi],
                               "ci_lo": [ci[0] if ci else m for m, ci in lo_hi],
                               "ci_hi": [ci[1] if ci else m for m, ci in lo_hi]})
        return rows, curves

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        s = self.s
        os.makedirs(s.out_dir, exist_ok=True)
        t0 = time.perf_counter()
        if s.prompts is not None and s.gt_cache:
            self.notes.append("GT-cache runs skipped: prompts came from a file, so there are no real clips whose "
                              "captions they are (use --prompts N for test-clip captions).")
        if any(m.sampler == "bidirectional" for m in self.methods):
            self.notes.append(f"bidirectional methods have no KV cache (no GT-cache gap); lengths > 1 use a sliding "
                              f"window of the training length with {self._stride()} new latent frames per window "
                              f"and the earlier frames re-noised at every step (replacement).")
        rows, curves, previews = [], [], {}
        entries = ([None] if s.real_baseline else []) + self.methods
        for length in s.lengths:
            ref = self.real_reference(length)
            for m in entries:
                name = REAL if m is None else m.name
                recs = self.samples_for(m, length)
                r, c = self.aggregate(name, length, recs, ref)
                rows += r
                curves += c
                if "preview" in recs[0]:
                    previews[(name, length)] = recs[0]["preview"]
        results = {"rows": rows, "curves": curves, "notes": self.notes,
                   "settings": {**{k: v for k, v in asdict(s).items() if k != "out_dir"},
                                "window": self.window, "kv_window": self._kv_window(),
                                "bidirectional_stride": self._stride(),
                                "latent_frames_per_length": self.ae.latent_frames(s.train_frames)},
                   "methods": [{**asdict(m), "shift": self._shift(m)} for m in self.methods],
                   "seconds": round(time.perf_counter() - t0, 2)}
        results["plots"] = write_plots(results, s.out_dir)
        results["previews"] = write_previews(previews, s.out_dir)
        atomic_write_text(os.path.join(s.out_dir, "results.json"),
                          json.dumps(results, indent=1, default=_json_default))
        atomic_write_text(os.path.join(s.out_dir, "report.md"), render_report(results))
        return results


# ------------------------------------------------------------------------------------------------- outputs
_CURVE_LABELS = {"fd": "Frechet distance (digit features) vs real", "adherence": "prompt adherence",
                 "flip_rate": "temporal flip rate", "brightness_drift": "|brightness - real|",
                 "contrast_drift": "|contrast - real|", "saturation_drift": "|saturation - real|"}


def write_plots(results: dict, out_dir: str) -> list[str]:
    """One PNG per (metric, length): the metric per window against the pixel frame index, a line per method
    (solid: own rollout, dashed: GT KV cache), shaded 95% intervals. matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = []
    curves = results["curves"]
    methods = list(dict.fromkeys(c["method"] for c in curves))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for length in dict.fromkeys(c["length"] for c in curves):
        for metric in dict.fromkeys(c["metric"] for c in curves):
            sel = [c for c in curves if c["length"] == length and c["metric"] == metric]
            if not sel:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
            for c in sel:
                x = c["frames"]
                style = "-" if c["context"] == "self" else "--"
                label = c["method"] + ("" if c["context"] == "self" else " (GT cache)")
                ax.plot(x, c["mean"], style, marker="o", ms=3, color=colours[c["method"]], label=label)
                ax.fill_between(x, c["ci_lo"], c["ci_hi"], color=colours[c["method"]], alpha=0.12, lw=0)
            ax.set_xlabel("pixel frame (window centre)")
            ax.set_ylabel(_CURVE_LABELS.get(metric, metric))
            ax.set_title(f"{_CURVE_LABELS.get(metric, metric)}, length x{length}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            rel = os.path.join("plots", f"{metric}_x{length}.png")
            path = os.path.join(out_dir, rel)

            def write(tmp, fig=fig):
                fig.savefig(tmp, format="png")

            atomic_write(path, write)
            plt.close(fig)
            paths.append(rel)
    return paths


def write_previews(previews: dict, out_dir: str) -> list[str]:
    """A contact sheet (PNG) of the first sample of each method and length."""
    from ..io.video import contact_sheet

    paths = []
    for (name, length), frames in previews.items():
        video = frames.float()[:, None].expand(-1, 3, -1, -1) / 127.5 - 1
        sheet = contact_sheet(video, columns=12)
        rel = os.path.join("samples", f"{name}_x{length}.png")

        def write(tmp, sheet=sheet):
            sheet.save(tmp, format="PNG")

        atomic_write(os.path.join(out_dir, rel), write)
        paths.append(rel)
    return paths


def _fmt(row: dict | None) -> str:
    if row is None or row["mean"] is None:
        return "-"
    v = row["mean"]
    digits = 3 if abs(v) < 10 else 1
    if row["ci"] is None:
        return f"{v:.{digits}f}"
    half = (row["ci"][1] - row["ci"][0]) / 2
    return f"{v:.{digits}f} ± {half:.{digits}f}"


_TABLE = [("fd", "FD ↓"), ("fd_slope", "FD slope /frame ↓"), ("adherence_first", "adherence (1st window) ↑"),
          ("adherence", "adherence ↑"), ("flip_rate", "flip rate ↓"), ("contrast_drift", "contrast drift ↓"),
          ("brightness_drift", "brightness drift ↓"), ("drift_slope", "pixel drift slope ↓")]
_GAP = [("fd", "FD"), ("adherence", "adherence"), ("flip_rate", "flip rate"), ("contrast_drift", "contrast drift")]


def render_report(results: dict) -> str:
    """The Markdown report: settings, a table per length, the GT-cache vs own-rollout table, plots, notes."""
    st = results["settings"]
    rows = {(r["method"], r["length"], r["metric"]): r for r in results["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    lengths = list(dict.fromkeys(r["length"] for r in results["rows"]))
    lines = ["# Evaluation report", "",
             f"{st['num_samples']} samples per method and length "
             f"(seeds {st['seed']}..{st['seed'] + st['num_samples'] - 1}), "
             f"training length {st['train_frames']} pixel frames, metric window {st['window']} frames, "
             f"{st['num_real']} real test clips as reference, rolling KV window {st['kv_window']} latent frames "
             f"({st['sink_frames']} sinks). Values: mean ± half the 95% bootstrap interval over samples. "
             f"`real` = held-out real clips scored the same way (what a perfect generator gets).", ""]
    lines += ["| method | sampler | shift | checkpoint |", "|---|---|---|---|"]
    for m in results["methods"]:
        lines.append(f"| {m['name']} | {m['sampler']} | {m['shift']} | `{m['checkpoint']}` |")
    lines.append("")
    for length in lengths:
        lines += [f"## Length x{length}", "", "| method | " + " | ".join(h for _, h in _TABLE) + " |",
                  "|---" * (len(_TABLE) + 1) + "|"]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(rows.get((m, length, k))) for k, _ in _TABLE) + " |")
        lines.append("")
    gap_methods = [m for m in methods if any((m, L, "fd_gap") in rows for L in lengths)]
    if gap_methods:
        lines += ["## Train-test gap: GT KV cache vs Self Forcing KV cache", "",
                  "The same causal model with its KV cache holding ground-truth frames (the real clip of the prompt, "
                  "teacher-forced context) versus its own rollout, same noise and prompts. gap = own rollout - GT "
                  "cache (paired over samples): the exposure bias of each method.", "",
                  "| method | length | " + " | ".join(f"{h} own / GT / gap" for _, h in _GAP) + " |",
                  "|---|---" + "|---" * len(_GAP) + "|"]
        for m in gap_methods:
            for length in lengths:
                if (m, length, "fd_gap") not in rows:
                    continue
                cells = [f"{_fmt(rows.get((m, length, k)))} / {_fmt(rows.get((m, length, k + '_gt_cache')))} / "
                         f"{_fmt(rows.get((m, length, k + '_gap')))}" for k, _ in _GAP]
                lines.append(f"| {m} | x{length} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("plots"):
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    if results.get("previews"):
        lines += ["## First sample of each method", ""] + [f"![{p}]({p})" for p in results["previews"]] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines.append(f"Computed in {results['seconds']} s (cached samples are not regenerated).")
    return "\n".join(lines) + "\n"


def evaluate(methods: Sequence[MethodSpec], settings: EvalSettings, log: Callable[[str], None] | None = None) -> dict:
    """Run an evaluation (see the module doc) and write ``results.json``, ``report.md`` and the PNGs."""
    return Evaluator(methods, settings, log=log).run()
