"""What an evaluation runs: the methods (a checkpoint with its sampler), the lengths, and the settings the whole
run shares (:class:`EvalSettings`), parsed from the command line or a method file, with the defaults a checkpoint
gives (its training run's timestep shift, the clips it trained on).

Nothing here loads a model or generates: :mod:`.runner` runs these specs and :mod:`.report` writes what they gave.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml

from ..pipeline import PipelineSpec, spec_file
from ..sampling import SAMPLERS

REAL = "real"  # the built-in baseline: held-out real clips scored like a method
_METHOD_KEYS = {"name", "checkpoint", "sampler", "preset", "use_ema", "num_steps", "guidance_scale", "shift",
                "steps"}


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
        """Validate the settings (ValueError naming the bad one) and normalise ``lengths``."""
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



def run_config(checkpoint: str) -> dict:
    """The training recipe (``config.yaml``) of the run that wrote ``checkpoint`` (in the folder or its parent),
    or {} when there is none."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    for d in (folder, os.path.dirname(os.path.abspath(folder))):
        p = os.path.join(d, "config.yaml")
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    data = yaml.safe_load(fh)
                return data if isinstance(data, dict) else {}
            except Exception:  # noqa: BLE001 - an unreadable recipe only loses the defaults it would give
                return {}
    return {}


def method_shift(m: MethodSpec, settings: EvalSettings) -> float:
    """The timestep shift a method samples with: its own, else the evaluation's, else the one its checkpoint was
    trained with (``pipeline.json``, else the run's ``config.yaml``), else 5.0."""
    if m.shift is not None:
        return float(m.shift)
    if settings.shift is not None:
        return float(settings.shift)
    if os.path.isfile(spec_file(m.checkpoint)):  # the trained folder says how it was trained
        return float(PipelineSpec.for_checkpoint(m.checkpoint).shift)
    return float(run_config(m.checkpoint).get("timestep_shift", 5.0))


def real_clip_settings(checkpoint: str, num_digits: tuple[int, int] | None = None,
                       images_per_digit: int | None = None) -> tuple[tuple[int, int], int | None]:
    """(num_digits, images_per_digit) of the real reference clips: the given values, else the training clips recorded
    in the checkpoint's pipeline.json, else the dataset's defaults (1..2 digits, every image)."""
    clips = (PipelineSpec.for_checkpoint(checkpoint) if os.path.exists(checkpoint) else PipelineSpec()).clip_settings()
    lo, hi = num_digits if num_digits is not None else clips["num_digits"]
    images = images_per_digit if images_per_digit is not None else clips["images_per_digit"]
    return (int(lo), int(hi)), images
