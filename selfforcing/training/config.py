"""Typed defaults of a training recipe. A recipe YAML sets any subset of these fields (unknown keys are
errors, see ``selfforcing.config``). Defaults follow the paper's released settings where they apply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..data.moving_digits import START_POSITIONS

METHODS = ("teacher", "teacher_forcing", "diffusion_forcing", "ode_init", "causvid", "self_forcing")
DISTRIBUTION_LOSSES = ("dmd", "sid", "gan")
LR_DECAYS = ("none", "cosine", "linear")


def check_range(obj, key: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, meaning: str = "") -> None:
    """Raise :class:`ConfigError` naming ``key`` (a dotted attribute path of ``obj``) when its value is outside
    [low, high] (an open end with ``low_open`` / ``high_open``); ``meaning`` says what the value does."""
    value = obj
    for part in key.split("."):
        value = getattr(value, part)
    bad = (low is not None and (value <= low if low_open else value < low)) or \
          (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"{key} must be {bounds}{f' ({meaning})' if meaning else ''}, got {value!r}")


@dataclass
class ModelSpec:
    """Which network: a preset (+ config overrides), optionally initialised from a checkpoint."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # a save_pretrained dir or a checkpoint file (any supported format)
    use_ema: bool = False  # take generator_ema from a training checkpoint


@dataclass
class OptimConfig:
    """AdamW with gradient clipping and a warmup-stable-decay learning rate (see
    :func:`selfforcing.training.trainer.learning_rate_factor`): a linear warmup over ``warmup_steps``, ``lr``
    until ``decay_start_step``, then ``decay`` (none | cosine | linear) down to ``lr * min_lr_ratio`` at the
    recipe's ``max_steps``. The defaults are the paper's constant learning rate."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    max_grad_norm: float = 10.0
    warmup_steps: int = 0
    decay: str = "none"  # none | cosine | linear
    decay_start_step: int = 0  # the decay begins here (or after the warmup, whichever is later)
    min_lr_ratio: float = 0.0  # the learning rate at max_steps, as a fraction of lr
    # parameters whose name starts with a key train at lr * its value (e.g. {caption_layout: 5}: a new part that must
    # catch up with trained weights); the first matching key wins
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.lr_multipliers.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"lr_multipliers.{key}: must be a number > 0, got {value!r}")
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"decay: unknown learning-rate decay {self.decay!r}; choose one of {list(LR_DECAYS)}")
        check_range(self, "lr", 0.0, low_open=True)
        check_range(self, "max_grad_norm", 0.0, low_open=True)
        check_range(self, "eps", 0.0, low_open=True)
        check_range(self, "weight_decay", 0.0)
        check_range(self, "warmup_steps", 0)
        check_range(self, "decay_start_step", 0)
        check_range(self, "min_lr_ratio", 0.0, 1.0)


@dataclass
class DataConfig:
    """Where batches come from.

    kind: moving-digits (clips rendered, encoded by the autoencoder, captions by the text encoder),
    store (precomputed latents / ODE pairs written by ``selfforcing data encode``), prompts (a prompt file:
    data-free Self Forcing), random (Gaussian latents and contexts: smoke tests and benchmarks).
    """

    kind: str = "moving-digits"
    path: str | None = None  # store directory or prompt file
    num_frames: int = 12  # pixel frames per clip (the autoencoder maps them to latent frames)
    size: int = 64
    num_digits: tuple[int, int] = (1, 2)
    images_per_digit: int | None = None  # moving-digits: draw each class from its first k images (None: all)
    start: str = "uniform"  # moving-digits: where a digit starts, uniform or behind its motion (render_clip)
    autoencoder: str = "moving-digits"
    text_encoder: str = "minilm"
    text_len: int = 32
    embedding_cache: str | None = None  # on-disk text-embedding cache (default: <out>/text_cache)
    latent_shape: tuple[int, int, int, int] = (12, 8, 16, 16)  # [F, C, H, W] for kind=random
    negative_prompt: str = ""  # the unconditional prompt for CFG / text dropout
    # image-video joint training (teacher; moving-digits or a store of clips): per micro-batch, this many single
    # frames (1-frame videos through the same model) beside the batch_size clips, weighted by image_loss_weight
    image_batch_size: int = 0
    image_loss_weight: float = 1.0


@dataclass
class DistributionMatchingConfig:
    """DMD / SiD / GAN settings (paper defaults; guidance in the standard convention)."""

    loss: str = "dmd"
    guidance_scale: float = 4.0  # standard CFG weight; the reference code's 3.0 (p_c + 3 (p_c - p_u))
    timestep_shift: float = 5.0
    min_timestep: float = 20.0  # clamp of the score timestep, as the reference (0.02 * 1000)
    max_timestep: float = 980.0
    critic_updates_per_generator_update: int = 5  # dfake_gen_update_ratio
    sid_alpha: float = 1.0
    gan_generator_weight: float = 1.0
    gan_discriminator_weight: float = 1.0
    gan_feature_layers: tuple[int, ...] = ()  # critic layers the discriminator head reads (default: last three)
    r1_weight: float = 0.0
    r1_sigma: float = 0.01


SUPERVISED_WINDOWS = ("last", "random")


@dataclass
class RolloutConfig:
    """Self Forcing rollout options (Algorithm 1) and the few-step sampler."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp_denoising_step: bool = True
    same_step_across_blocks: bool = True
    last_step_only: bool = False
    context_noise: float = 0.0
    num_rollout_frames: int | None = None  # latent frames generated (default: the data's frame count)
    supervised_frames: int | None = None  # loss on the last N frames only (default: all)
    # "last": the supervised N frames end the rollout; "random": the rollout stops at a chunk-aligned window of N
    # frames drawn uniformly within num_rollout_frames (Self-Forcing++-style long-horizon training: every position
    # of a stream gets trained, the start included)
    supervised_window: str = "last"
    # the rollout's KV cache is the generator's own: a rolling window when its config sets local_attn_size (with
    # sink_size sinks), exactly as it streams at inference; else the whole rollout, as Algorithm 1


@dataclass
class TrainConfig:
    """One training run. ``method`` picks what is trained and how; everything runs in one loop."""

    method: str = "teacher"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 4  # per rank and micro-batch
    grad_accum: int = 1
    out_dir: str = "runs/default"
    # a new run whose out_dir holds no checkpoint starts from this training state (a checkpoint, or a run / its
    # checkpoints folder: the newest): models, optimisers, EMA and step, as if resumed; the recipe may change
    # anything but the networks' architecture (e.g. a long-horizon Self Forcing stage after the standard one)
    init_from: str | None = None

    generator: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec | None = None  # the real score (DMD/SiD), the ODE teacher; default: generator's init
    critic: ModelSpec | None = None  # the fake score / discriminator backbone; default: the teacher
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-5))

    ema_weight: float = 0.0  # 0 disables EMA
    ema_start_step: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU; or "fp32" / "bf16"
    parallel: str = "none"  # none | ddp | fsdp2

    timestep_shift: float = 5.0  # shifted timestep sampling of the flow-matching losses
    # distribution of the flow-matching losses' timesteps before the shift: uniform (Wan) or logit_normal (SD3)
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    text_dropout: float = 0.1  # probability of the unconditional prompt (teacher, for CFG)
    context_noise: float = 0.0  # teacher forcing: timestep of the clean context (noise augmentation)
    sample_num_steps: int = 24  # Euler steps of the many-step samplers (sample videos, and pipeline.json's num_steps)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dm: DistributionMatchingConfig = field(default_factory=DistributionMatchingConfig)

    log_every: int = 10
    checkpoint_every: int = 200
    checkpoint_format: str = "full"  # full: one file gathered on rank 0; sharded: torch.distributed.checkpoint
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: never
    tensorboard: bool = True
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.dm.loss not in DISTRIBUTION_LOSSES:
            raise ValueError(f"unknown distribution-matching loss {self.dm.loss!r}; "
                             f"choose one of {list(DISTRIBUTION_LOSSES)}")
        if self.checkpoint_format not in ("full", "sharded"):
            raise ValueError(f"checkpoint_format must be full or sharded, got {self.checkpoint_format!r}")
        if self.parallel not in ("none", "ddp", "fsdp2"):
            raise ValueError(f"parallel must be none, ddp or fsdp2, got {self.parallel!r}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be uniform or logit_normal, got {self.timestep_sampling!r}")
        if self.data.start not in START_POSITIONS:
            raise ValueError(f"data.start must be one of {START_POSITIONS}, got {self.data.start!r}")
        if self.data.image_batch_size < 0 or self.data.image_loss_weight < 0:
            raise ValueError("data.image_batch_size and data.image_loss_weight must be >= 0")
        if self.data.image_batch_size and (self.method != "teacher"
                                           or self.data.kind not in ("moving-digits", "store")):
            raise ValueError("data.image_batch_size (image-video joint training) needs method=teacher and data.kind "
                             f"moving-digits or store, got method={self.method!r}, data.kind={self.data.kind!r}")
        check_range(self, "max_steps", 0)
        check_range(self, "batch_size", 1)
        check_range(self, "grad_accum", 1)
        check_range(self, "log_every", 1, meaning="a metrics line every N steps")
        check_range(self, "checkpoint_every", 0, meaning="a checkpoint every N steps; 0: never")
        check_range(self, "sample_every", 0, meaning="sample videos every N steps; 0: never")
        check_range(self, "keep_checkpoints", 0, meaning="the newest N checkpoints are kept; 0: all")
        check_range(self, "ema_weight", 0.0, 1.0, high_open=True, meaning="0 turns EMA off")
        check_range(self, "ema_start_step", 0)
        check_range(self, "text_dropout", 0.0, 1.0)
        check_range(self, "timestep_shift", 0.0, low_open=True)
        check_range(self, "sample_num_steps", 1)
        check_range(self, "context_noise", 0.0, 1000.0)
        check_range(self, "data.num_frames", 1)
        check_range(self, "data.size", 1)
        check_range(self, "data.text_len", 1)
        check_range(self, "dm.timestep_shift", 0.0, low_open=True)
        check_range(self, "dm.critic_updates_per_generator_update", 1)
        check_range(self, "rollout.context_noise", 0.0, 1000.0)
        self._check_rollout()

    def _check_rollout(self) -> None:
        r = self.rollout
        if r.supervised_window not in SUPERVISED_WINDOWS:
            raise ConfigError(f"rollout.supervised_window must be one of {SUPERVISED_WINDOWS}, "
                              f"got {r.supervised_window!r}")
        for key in ("num_rollout_frames", "supervised_frames"):
            if getattr(r, key) is not None:
                check_range(self, f"rollout.{key}", 1)
        if r.num_rollout_frames and r.supervised_frames and r.supervised_frames > r.num_rollout_frames:
            raise ConfigError(f"rollout.supervised_frames ({r.supervised_frames}) exceeds "
                              f"rollout.num_rollout_frames ({r.num_rollout_frames})")
