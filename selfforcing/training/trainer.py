"""The one training loop: every method of ``methods.py`` runs through :func:`train`.

Per step: re-seed (from run seed, step and rank), then for each network the method updates at this step
(``update_schedule``): zero grads, ``grad_accum`` micro-batches of loss/backward, average gradients over ranks
(data parallel) or let FSDP2 reduce them, clip, AdamW step, EMA of the generator. Checkpoints every
``checkpoint_every`` steps are atomic and hold everything needed to resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass

import torch

from ..config import ConfigError, save_config, to_dict
from ..fileio import TEMP_PREFIX, atomic_write_text, remove_stale_temps, replace_folder
from ..models import CausalWanModel
from ..pipeline import PipelineSpec
from . import distributed as D
from .checkpoint import load_init_from, resume_checkpoint, save_checkpoint
from .config import ModelSpec, OptimConfig, TrainConfig
from .data import SAMPLE_PURPOSE, build_batch_source
from .ema import EMA
from .methods import METHOD_CLASSES, GANCritic, needs_critic, needs_teacher
from .parallelize import all_reduce_gradients, apply_fsdp2, broadcast_parameters


def build_model(spec: ModelSpec, device: torch.device) -> CausalWanModel:
    """A CausalWanModel from a spec: the preset (+ overrides), weights from ``spec.checkpoint`` if given."""
    if spec.checkpoint:
        model = CausalWanModel.from_checkpoint(spec.checkpoint, preset=spec.preset, use_ema=spec.use_ema,
                                               **spec.overrides)
    else:
        model = CausalWanModel.from_preset(spec.preset, **spec.overrides)
    return model.to(device)


@dataclass
class TrainState:
    step: int
    method: object
    models: dict
    optimizers: dict
    ema: EMA | None
    history: list


def _autocast(cfg: TrainConfig, device: torch.device):
    if _bf16(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parameter_groups(model: torch.nn.Module, lr_multipliers: dict[str, float]) -> list[dict]:
    """The trainable parameters of ``model`` as AdamW groups, one per learning-rate multiplier: a parameter whose name
    starts with a key of ``lr_multipliers`` gets that key's value (the first match), any other 1. A key that matches
    no parameter is a ConfigError (a typo would silently train at the base rate)."""
    groups: dict[float, list] = {}
    used = set()
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in lr_multipliers if pname.startswith(k)), None)
        used.add(key)
        groups.setdefault(1.0 if key is None else float(lr_multipliers[key]), []).append(p)
    unused = sorted(set(lr_multipliers) - used)
    if unused:
        raise ConfigError(f"lr_multipliers: {unused} match no trainable parameter name")
    return [{"params": ps, "lr_multiplier": mult} for mult, ps in sorted(groups.items())]


def setup(cfg: TrainConfig, device: torch.device | None = None) -> TrainState:
    """Build networks, method, optimisers and EMA (and parallelise) for ``cfg``."""
    device = device or D.init_from_env()
    D.seed_everything(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    generator = build_model(cfg.generator, device)
    teacher = critic = None
    if needs_teacher(cfg) or needs_critic(cfg):
        teacher_spec = cfg.teacher or cfg.generator
        if needs_teacher(cfg):
            teacher = build_model(teacher_spec, device).eval().requires_grad_(False)
        if needs_critic(cfg):
            critic = build_model(cfg.critic or teacher_spec, device)
            if cfg.dm.loss == "gan" and cfg.method == "self_forcing":
                critic = GANCritic(critic, cfg.dm.gan_feature_layers).to(device)
    trainables = {"generator": generator}
    if critic is not None:
        trainables["critic"] = critic
    for m in trainables.values():
        m.train()
        if cfg.gradient_checkpointing:
            (m.backbone if isinstance(m, GANCritic) else m).enable_gradient_checkpointing()
        if cfg.parallel == "fsdp2":
            apply_fsdp2(m, device, bf16=_bf16(cfg, device))
        elif cfg.parallel == "ddp":
            broadcast_parameters(m)
    method = METHOD_CLASSES[cfg.method](cfg, generator, teacher=teacher, critic=critic)
    optimizers = {}
    for name, m in method.trainable().items():
        o = cfg.generator_optim if name == "generator" else cfg.critic_optim
        optimizers[name] = torch.optim.AdamW(parameter_groups(m, o.lr_multipliers), lr=o.lr,
                                             betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    ema = EMA(generator, cfg.ema_weight, cfg.ema_start_step) if cfg.ema_weight > 0 else None
    return TrainState(0, method, method.trainable(), optimizers, ema, [])


def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")


def learning_rate_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The multiplier of ``optim.lr`` at optimisation step ``step`` (0-based) of a ``max_steps`` recipe:
    warmup-stable-decay. With W = warmup_steps, S = max(decay_start_step, W), r = min_lr_ratio and
    p = (step - S) / (max_steps - S) clipped to [0, 1]:

        step < W:   (step + 1) / W                       (linear warmup; the first step already moves)
        step < S:   1
        otherwise:  r + (1 - r) * (1 + cos(pi p)) / 2    (cosine)   or   1 - (1 - r) p   (linear)

    A pure function of the step, so a resumed run follows the same schedule as a straight one.
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    start = max(optim.decay_start_step, optim.warmup_steps)
    if optim.decay == "none" or step < start:
        return 1.0
    p = min(1.0, (step - start) / max(1, max_steps - start))
    r = optim.min_lr_ratio
    if optim.decay == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - (1.0 - r) * p


def train_step(cfg: TrainConfig, state: TrainState, batches, device: torch.device) -> dict[str, float]:
    """One optimisation step of every network the method updates at ``state.step``; returns the logs."""
    step = state.step
    torch.manual_seed(hash((cfg.seed, step, D.rank())) % (2**63))  # all in-step randomness, resumable
    logs: dict[str, float] = {}
    for purpose, name in enumerate(state.method.update_schedule(step)):
        model, opt = state.models[name], state.optimizers[name]
        opt.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = batches.batch(step, micro, purpose)
            with _autocast(cfg, device):
                loss, parts = state.method.loss(name, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: non-finite {name} loss {float(loss)}")
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        if cfg.parallel == "ddp":
            all_reduce_gradients(model)
        optim_cfg = cfg.generator_optim if name == "generator" else cfg.critic_optim
        params = [p for p in model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, optim_cfg.max_grad_norm) if params else torch.tensor(0.0)
        logs[f"{name}_grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = optim_cfg.lr * learning_rate_factor(step, optim_cfg, cfg.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)
        logs[f"{name}_lr"] = lr
        opt.step()
        if name == "generator" and state.ema is not None:
            state.ema.update(step)
    state.step += 1
    return logs


@torch.no_grad()
def sample_video(cfg: TrainConfig, state: TrainState, batch: dict) -> torch.Tensor:
    """Latents [B, F, C, H, W] sampled by the generator the way the method uses it at inference: the teacher with
    the many-step bidirectional sampler, TF/DF models with the many-step causal sampler (both with CFG), every
    few-step student with the KV-cache rollout of Algorithm 2. Runs on every rank (FSDP collectives)."""
    from ..sampling import rollout_with_kv_cache, sample_bidirectional, sample_causal_many_step

    g = state.method.generator
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(latents.device)
    ctx, null = batch["context"], batch["null_context"]
    was_training = g.training
    g.eval()
    try:
        if cfg.method == "teacher":
            video, _ = sample_bidirectional(g, noise, ctx, null_context=null, num_steps=cfg.sample_num_steps,
                                            shift=cfg.timestep_shift, guidance_scale=cfg.dm.guidance_scale)
        elif cfg.method in ("teacher_forcing", "diffusion_forcing"):
            video = sample_causal_many_step(g, noise, ctx, block_sizes=g.block_sizes(noise.shape[1]), null_context=null,
                                            num_steps=cfg.sample_num_steps, shift=cfg.timestep_shift,
                                            guidance_scale=cfg.dm.guidance_scale)
        else:
            video = rollout_with_kv_cache(g, noise, ctx, state.method._steps(),
                                          block_sizes=g.block_sizes(noise.shape[1])).video
    finally:
        g.train(was_training)
    return video


def _write_samples(cfg: TrainConfig, state: TrainState, batches) -> None:
    if not hasattr(batches, "autoencoder"):
        return  # only sources with a decoder can show pixels
    from ..io import write_contact_sheet, write_mp4

    batch = batches.batch(0, 0, SAMPLE_PURPOSE)  # the same prompts at every sampling step
    video = batches.autoencoder.decode(sample_video(cfg, state, batch)[:1])[0]
    if D.is_main():
        folder = os.path.join(cfg.out_dir, "samples")
        try:
            write_mp4(os.path.join(folder, f"step_{state.step:06d}.mp4"), video)
        except ImportError as err:  # PyAV absent (e.g. a bare GPU image): the PNG still shows the sample
            warnings.warn(f"sample mp4 skipped ({err}); writing the contact sheet only", stacklevel=2)
        write_contact_sheet(os.path.join(folder, f"step_{state.step:06d}.png"), video)
        with open(os.path.join(folder, f"step_{state.step:06d}.txt"), "w") as fh:
            fh.write(batch["prompts"][0] + "\n")


class _Logger:
    """TensorBoard (optional), Weights & Biases (optional) and a JSONL file, on rank 0."""

    def __init__(self, cfg: TrainConfig, step: int = 0) -> None:
        """Log from ``step`` on: lines of later steps (written before a kill) are dropped from metrics.jsonl and
        TensorBoard, so a resumed run never repeats a step."""
        self.tb = self.wandb = None
        self.jsonl = None
        if not D.is_main():
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        truncate_metrics(path, step)
        self.jsonl = open(path, "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=step + 1)
            except ImportError:
                pass
        if cfg.wandb_project:
            import wandb  # optional dependency: only imported when asked for

            self.wandb = wandb.init(project=cfg.wandb_project, config=to_dict(cfg), dir=cfg.out_dir)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        for h in (self.jsonl, self.tb):
            if h is not None:
                h.close()


def truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (the step a run resumes from; 0 drops them all), and drop
    a line cut short by a kill. Rewritten atomically; nothing happens when there is nothing to drop."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step and line.endswith("\n"):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def stale_temp_folders(cfg: TrainConfig) -> list[str]:
    """The folders of a run where killed atomic writes can leave ``.tmp-*`` files: the run folder (``final/``
    export), its checkpoints, samples and its own text-embedding cache (a cache given in the recipe may be shared
    with other runs, so it is left alone)."""
    return [os.path.join(cfg.out_dir, sub) for sub in ("", "checkpoints", "samples", "text_cache")]


def train(cfg: TrainConfig, max_steps: int | None = None, progress: bool = True, resume: bool = True) -> TrainState:
    """Run (or resume) the recipe ``cfg`` up to ``max_steps`` (default ``cfg.max_steps``).

    Resume starts from the newest intact checkpoint in ``out_dir/checkpoints`` (a corrupt one is skipped with a
    warning); temp files of writes killed before are removed first, and metrics.jsonl is cut back to the step the
    run resumes from."""
    device, state, batches = _start_run(cfg, resume)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    logger = _Logger(cfg, state.step)
    total = cfg.max_steps if max_steps is None else max_steps
    bar = None
    if progress and D.is_main():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.step, desc=cfg.method, dynamic_ncols=True)
    t_last = time.perf_counter()
    window: dict[str, list[float]] = {}  # metric -> [sum, count] since the last log line
    spec = None  # the generator's PipelineSpec, recorded in every checkpoint (made at the first one)
    while state.step < total:
        logs = train_step(cfg, state, batches, device)
        step = state.step
        logs = D.all_reduce_mean(logs)
        now = time.perf_counter()
        logs["seconds_per_step"] = now - t_last
        t_last = now
        state.history.append({"step": step, **logs})
        for k, v in logs.items():
            acc = window.setdefault(k, [0.0, 0])
            acc[0] += v
            acc[1] += 1
        if step % cfg.log_every == 0 or step == total:
            # each metric's mean over the steps since the last line that produced it: the generator of a
            # distribution-matching method updates every few steps, so a line never misses its loss
            logger.log(step, {k: total_ / n for k, (total_, n) in window.items()})
            window.clear()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == total):
            _write_samples(cfg, state, batches)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total):
            spec = _spec_at(spec, cfg, batches, step)
            save_checkpoint(ckpt_dir, step, state.models, state.optimizers, state.ema,
                            {"config": to_dict(cfg), "pipeline": spec.to_json()},
                            sharded=cfg.checkpoint_format == "sharded", keep=cfg.keep_checkpoints)
    if bar is not None:
        bar.close()
    logger.close()
    if total > 0 and state.step >= total:
        export_generator(state, os.path.join(cfg.out_dir, "final"), _spec_at(spec, cfg, batches, state.step))
    return state


def _start_run(cfg: TrainConfig, resume: bool):
    """(device, state, batch source) of a run: temp files of killed writes removed, the models and optimisers
    built and, with ``resume``, loaded from the newest intact checkpoint; failing that, from ``cfg.init_from``
    (another run's training state, its step included); the recipe saved as config.yaml."""
    device = D.init_from_env()
    if D.is_main():
        for folder in stale_temp_folders(cfg):
            remove_stale_temps(folder)
    D.barrier()
    state = setup(cfg, device)
    text_dim = state.method.generator.config.text_dim
    batches = build_batch_source(cfg, text_dim, device)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    meta = resume_checkpoint(ckpt_dir, state.models, state.optimizers, state.ema) if resume else None
    if meta is None and cfg.init_from:  # a new stage that carries on from another run's training state
        meta = load_init_from(cfg.init_from, state.models, state.optimizers, state.ema)
    if meta is not None:
        state.step = int(meta["step"])
    if D.is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    return device, state, batches


# How each method's generator is sampled: the teacher sees the whole clip, the TF / DF baselines need many steps with
# CFG, everything distilled (ODE init, CausVid, Self Forcing) streams with the few-step KV-cache sampler.
_SAMPLER_OF_METHOD = {"teacher": "bidirectional", "teacher_forcing": "many-step", "diffusion_forcing": "many-step"}


def _clip_start(cfg: TrainConfig) -> str:
    """Where the training clips' digits started (Moving-Digits ``start``): the recipe's setting, or for a store the
    setting it was encoded with (its manifest's attrs; "uniform" for stores written before the attr existed)."""
    if cfg.data.kind == "store" and cfg.data.path:
        from ..data.store import read_manifest

        return read_manifest(cfg.data.path).get("attrs", {}).get("start", "uniform")
    return cfg.data.start


def _spec_at(spec: PipelineSpec | None, cfg: TrainConfig, batches, step: int) -> PipelineSpec:
    """The generator's spec at ``step``: made once (it draws the sample batch for the latent size), then only its
    ``trained_steps`` moves on."""
    spec = spec or pipeline_spec(cfg, batches, step)
    spec.extra["trained_steps"] = step
    return spec


def pipeline_spec(cfg: TrainConfig, batches, step: int) -> PipelineSpec:
    """The :class:`~selfforcing.pipeline.PipelineSpec` of a generator trained by ``cfg``: the recipe's autoencoder,
    text encoder, latent size, few-step timesteps and shift, so that ``generate`` samples it as it was trained."""
    sample = batches.batch(0, 0, SAMPLE_PURPOSE)
    latents = sample.get("latents", sample.get("ode_states"))
    latent_size = tuple(latents.shape[-2:]) if latents is not None else tuple(cfg.data.latent_shape[-2:])
    return PipelineSpec(
        method=cfg.method, sampler=_SAMPLER_OF_METHOD.get(cfg.method, "few-step"), autoencoder=cfg.data.autoencoder,
        text_encoder=cfg.data.text_encoder, text_len=cfg.data.text_len, latent_size=latent_size,
        denoising_steps=tuple(cfg.rollout.denoising_steps), warp_denoising_step=cfg.rollout.warp_denoising_step,
        shift=cfg.timestep_shift, num_steps=cfg.sample_num_steps, guidance_scale=cfg.dm.guidance_scale,
        negative_prompt=cfg.data.negative_prompt, training_frames=cfg.data.num_frames,
        dataset={"kind": cfg.data.kind, "num_digits": list(cfg.data.num_digits),
                 "images_per_digit": cfg.data.images_per_digit, "size": cfg.data.size, "start": _clip_start(cfg)},
        extra={"recipe_method": cfg.method, "dm_loss": cfg.dm.loss, "trained_steps": step, "seed": cfg.seed,
               "batch_size": cfg.batch_size, "out_dir": cfg.out_dir})


def export_generator(state: TrainState, folder: str, spec: PipelineSpec | None = None) -> None:
    """Write the trained generator as a ``save_pretrained`` folder (the EMA weights when EMA is on, else the raw
    ones; the raw ones also go to ``folder/raw`` in that case), with ``spec`` as ``pipeline.json`` beside it.
    Atomic: the folder is built under a ``.tmp-`` name and renamed, so a kill leaves the old folder or none, never
    a partial one. A collective under FSDP2: every rank calls it."""
    from .checkpoint import gather_model_state

    generator = state.method.generator
    raw = gather_model_state(generator)
    ema = state.ema.full_state_dict()["shadow"] if state.ema is not None and state.ema.initialized else None
    if D.is_main():
        config = {k: v for k, v in generator.config.items() if not k.startswith("_")}
        out = CausalWanModel(**config)
        # written whole into a temp folder beside it, then renamed: ``folder`` is always complete or absent
        tmp = os.path.join(os.path.dirname(os.path.abspath(folder)), f"{TEMP_PREFIX}{os.path.basename(folder)}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        for weights, where in ((ema, tmp), (raw, os.path.join(tmp, "raw"))) if ema is not None else ((raw, tmp),):
            out.load_weights({k: v.to(out.proj_out.weight.dtype) for k, v in weights.items()},
                             source="trained generator")
            out.save_pretrained(where)
            if spec is not None:
                spec.save(where)
        replace_folder(tmp, folder)
    D.barrier()
