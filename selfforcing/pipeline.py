"""A generator checkpoint together with everything needed to sample it: the *pipeline spec*.

A trained generator is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``). The trainer also
writes ``pipeline.json`` beside them, so that whoever loads the folder samples it the way it was trained:

    {"format": "selfforcing-pipeline-v1", "method": "self_forcing", "sampler": "few-step",
     "autoencoder": "moving-digits", "text_encoder": "minilm", "text_len": 24, "latent_size": [16, 16],
     "denoising_steps": [1000, 750, 500, 250], "warp_denoising_step": true, "shift": 3.0,
     "num_steps": 24, "guidance_scale": 3.0, "negative_prompt": "", "training_frames": 12, "fps": 8.0}

``denoising_steps`` are nominal (in [0, 1000]); with ``warp_denoising_step`` they are warped by ``shift`` exactly as
the training rollout warps them (:func:`selfforcing.flow.denoising_step_list`). A folder without ``pipeline.json``
(an original checkpoint, a diffusers folder) gets :class:`PipelineSpec`'s defaults, which the command line can
override one by one.

Names of shipped models (``moving-digits``) resolve to folders inside the installed package, so
``selfforcing generate --prompt ...`` works on a fresh install without a path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .sampling import SAMPLERS

SPEC_FILE = "pipeline.json"
SPEC_FORMAT = "selfforcing-pipeline-v1"
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "models")
SHIPPED_MODELS = {"moving-digits": os.path.join(_ASSETS, "moving_digits")}
DEFAULT_MODEL = "moving-digits"


@dataclass
class PipelineSpec:
    """How a generator is sampled (see the module docstring for the JSON form)."""

    method: str = "self_forcing"
    sampler: str = "few-step"  # few-step (KV-cache streaming) | many-step (Euler + CFG, causal) | bidirectional
    autoencoder: str = "moving-digits"
    text_encoder: str = "minilm"
    text_len: int | None = None  # None: the text encoder's own length (build_text_encoder)
    latent_size: tuple[int, int] = (16, 16)
    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp_denoising_step: bool = True
    shift: float = 5.0
    num_steps: int = 50  # Euler steps of the many-step samplers
    guidance_scale: float = 3.0
    negative_prompt: str = ""
    training_frames: int | None = None  # pixel frames of a training clip (the "1x" length)
    fps: float = 8.0
    default_prompt: str = "the digit 3 moves right"
    # the training clips' settings (Moving-Digits: num_digits, images_per_digit, size); `selfforcing eval` draws
    # its real reference clips with them
    dataset: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # provenance (recipe, steps, ...), never read by the sampler

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {tuple(SAMPLERS)}")
        self.latent_size = tuple(int(v) for v in self.latent_size)
        self.denoising_steps = tuple(float(v) for v in self.denoising_steps)
        if len(self.latent_size) != 2 or min(self.latent_size) < 1:
            raise ValueError(f"latent_size must be (h, w) >= 1, got {self.latent_size}")
        if not self.denoising_steps or not all(0 < s <= 1000 for s in self.denoising_steps):
            raise ValueError(f"denoising_steps must be non-empty and in (0, 1000], got {self.denoising_steps}")

    def warped_steps(self):
        """The timesteps the few-step sampler visits, float64 [K] (warped with ``shift`` when asked)."""
        from . import flow

        return flow.denoising_step_list(list(self.denoising_steps), shift=self.shift, warp=self.warp_denoising_step)

    def to_json(self) -> dict:
        return {"format": SPEC_FORMAT, **{k: (list(v) if isinstance(v, tuple) else v)
                                          for k, v in dataclasses.asdict(self).items()}}

    def save(self, folder: str | os.PathLike) -> str:
        from .fileio import atomic_write_text

        path = os.path.join(os.fspath(folder), SPEC_FILE)
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PipelineSpec:
        """The spec in ``folder/pipeline.json``, or the defaults when there is none (or ``folder`` is a file)."""
        path = os.path.join(os.fspath(folder), SPEC_FILE)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable pipeline spec ({err})") from err
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data, source: str) -> PipelineSpec:
        """A spec from its :meth:`to_json` form (not modified); errors name ``source``."""
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            raise ValueError(f"{source}: not a {SPEC_FORMAT} file")
        data = {k: v for k, v in data.items() if k != "format"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def for_checkpoint(cls, checkpoint: str | os.PathLike) -> PipelineSpec:
        """The spec of a checkpoint: a folder's ``pipeline.json``; for a file, the one beside it, else the spec our
        trainer records in its training checkpoints (so a teacher's checkpoint is sampled bidirectionally); the
        defaults if there is none."""
        path = spec_file(checkpoint)
        if os.path.isfile(path) or os.path.isdir(checkpoint) or not str(checkpoint).endswith((".pt", ".pth")):
            return cls.load(os.path.dirname(path))
        import torch

        try:  # memory-mapped: only the small "pipeline" entry is read, not the weights
            obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the weight loader, with its reason
            return cls()
        recorded = obj.get("pipeline") if isinstance(obj, dict) else None
        return cls.from_json(recorded, f"{checkpoint} (its pipeline entry)") if recorded else cls()

    def clip_settings(self) -> dict:
        """The Moving-Digits settings of the training clips as ``render_clip`` keywords: ``num_digits`` (lo, hi) and
        ``images_per_digit`` (None: every image), ``start`` (where digits start), the dataset's defaults where
        ``dataset`` does not say."""
        lo, hi = self.dataset.get("num_digits", (1, 2))
        images = self.dataset.get("images_per_digit")
        return {"num_digits": (int(lo), int(hi)), "images_per_digit": None if images is None else int(images),
                "start": self.dataset.get("start", "uniform")}

    def replace(self, **changes) -> PipelineSpec:
        """A copy with the non-None ``changes`` applied (command-line overrides)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def spec_file(checkpoint: str | os.PathLike) -> str:
    """Where a checkpoint's ``pipeline.json`` lives: in the folder itself, or beside a checkpoint file."""
    checkpoint = os.fspath(checkpoint)
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
    return os.path.join(folder, SPEC_FILE)


def resolve_checkpoint(name_or_path: str | os.PathLike | None) -> str:
    """A shipped model's name (or None: the default model) -> its folder; a path is returned as is.

    Raises FileNotFoundError naming the shipped models when a name is neither a shipped model nor a path."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    name_or_path = os.fspath(name_or_path)
    if name_or_path in SHIPPED_MODELS:
        folder = SHIPPED_MODELS[name_or_path]
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"the shipped model {name_or_path!r} is missing from the installation "
                                    f"({folder}); reinstall selfforcing")
        return folder
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"checkpoint not found: {name_or_path!r} (neither a path nor a shipped model: "
                                f"{sorted(SHIPPED_MODELS)})")
    return name_or_path


def load_pipeline(checkpoint: str | os.PathLike | None = None, *, preset: str = "tiny", use_ema: bool = False,
                  device: str = "cpu", **spec_overrides):
    """(model, autoencoder, text encoder, spec) of a checkpoint, ready to sample on ``device``.

    ``checkpoint``: a shipped model name (default ``moving-digits``), a ``save_pretrained`` folder, a training
    checkpoint or an original Wan / CausVid / Self Forcing file (``preset`` names its architecture).
    ``spec_overrides``: :class:`PipelineSpec` fields to change (None values are ignored)."""
    from .autoencoders import get_autoencoder
    from .models import CausalWanModel
    from .text import build_text_encoder

    path = resolve_checkpoint(checkpoint)
    spec = PipelineSpec.for_checkpoint(path).replace(**spec_overrides)
    model = CausalWanModel.from_checkpoint(path, preset=preset, use_ema=use_ema).eval().to(device)
    autoencoder = get_autoencoder(spec.autoencoder, device=device)
    text = build_text_encoder(spec.text_encoder, spec.text_len, device=device)
    if spec.text_len is None:  # a folder without a spec: the encoder's own length (MiniLM 24, UMT5 Wan's)
        spec = spec.replace(text_len=text.text_len)
    if text.dim != model.config.text_dim:
        raise ValueError(f"the text encoder {spec.text_encoder!r} gives {text.dim}-dim states but the checkpoint "
                         f"{path} expects {model.config.text_dim}")
    return model, autoencoder, text, spec


def load_streaming_generator(checkpoint: str | os.PathLike | None = None, *, preset: str = "tiny",
                             use_ema: bool = False, device: str = "cpu", window_frames: int | None = None,
                             sink_frames: int | None = None, max_frames: int = 1024, batch_size: int = 1,
                             **spec_overrides):
    """A :class:`selfforcing.inference.StreamingGenerator` for a checkpoint (see :func:`load_pipeline`), sampling
    with the spec's few-step timesteps. Returns (generator, spec).

    Raises ValueError when the checkpoint's ``pipeline.json`` names a many-step sampler (the bidirectional teacher,
    teacher forcing, diffusion forcing): streaming runs the few-step KV-cache sampler, which such a model was not
    trained for, so its video would be noise. ``sampler="few-step"`` in ``spec_overrides`` forces it anyway."""
    from .inference import StreamingGenerator

    model, ae, text, spec = load_pipeline(checkpoint, preset=preset, use_ema=use_ema, device=device,
                                          **spec_overrides)
    if spec.sampler != "few-step":
        raise ValueError(f"{resolve_checkpoint(checkpoint)} is a {spec.sampler} model (its pipeline.json says "
                         f"sampler={spec.sampler!r}), not a few-step streaming generator: sample it with "
                         f"`selfforcing generate --checkpoint ...` (which runs its {spec.sampler} sampler with CFG), "
                         f"or pass sampler='few-step' to stream it anyway")
    gen = StreamingGenerator(model, ae, text, spec.latent_size, steps=spec.warped_steps().tolist(),
                             window_frames=window_frames, sink_frames=sink_frames, max_frames=max_frames,
                             batch_size=batch_size, negative_prompt=spec.negative_prompt)
    return gen, spec


def sample_many_step(model, autoencoder, text_encoder, spec: PipelineSpec, prompt: str, latent_frames: int, *,
                     seed: int = 0, window_frames: int | None = None, sink_frames: int | None = None):
    """One video from the spec's many-step sampler, decoded: pixel frames [F, 3, H, W] in [-1, 1].

    Noise z ~ N(0, I) of shape [1, latent_frames, C, h, w] (seeded), then ``spec.num_steps`` Euler steps of the
    probability-flow ODE on the ``spec.shift``-warped grid with classifier-free guidance
    v = v(x, null) + g (v(x, prompt) - v(x, null)), g = ``spec.guidance_scale``, null = the negative prompt:
    ``bidirectional`` denoises the whole clip at once (the teacher; meant for its training length), ``many-step``
    denoises chunk by chunk with separate conditional and unconditional KV caches (teacher forcing, diffusion
    forcing; ``window_frames`` / ``sink_frames`` bound the cache)."""
    import torch

    from .sampling import sample_bidirectional, sample_causal_many_step

    if spec.sampler not in ("bidirectional", "many-step"):
        raise ValueError(f"sample_many_step needs a many-step sampler, the spec says {spec.sampler!r}")
    ctx = text_encoder.encode([prompt]).states
    null = text_encoder.encode([spec.negative_prompt]).states
    noise = torch.randn((1, latent_frames, model.config.in_channels, *spec.latent_size),
                        generator=torch.Generator().manual_seed(seed)).to(ctx.device)
    with torch.no_grad():
        if spec.sampler == "bidirectional":
            latents, _ = sample_bidirectional(model, noise, ctx, null_context=null, num_steps=spec.num_steps,
                                              shift=spec.shift, guidance_scale=spec.guidance_scale)
        else:
            latents = sample_causal_many_step(model, noise, ctx, block_sizes=model.block_sizes(latent_frames),
                                              null_context=null, num_steps=spec.num_steps, shift=spec.shift,
                                              guidance_scale=spec.guidance_scale, window_frames=window_frames,
                                              sink_frames=sink_frames)
        return autoencoder.decode(latents)[0]
