"""Training methods. Each says which networks it trains, which it updates at a step, and the loss of each;
the one loop in ``trainer.py`` does everything else (optimisers, accumulation, clipping, EMA, checkpoints).

| method            | trains                 | generator input                          | loss |
|-------------------|------------------------|------------------------------------------|------|
| teacher           | bidirectional model    | data noised at one shifted t per clip     | flow matching, text dropout |
| diffusion_forcing | causal model           | data noised per block (independent t)     | flow matching |
| teacher_forcing   | causal model           | noisy blocks + clean context (TF layout)  | flow matching |
| ode_init          | causal model           | teacher ODE states at the few-step grid   | regression to the ODE end |
| causvid           | causal model + critic  | data noised per block at the few-step grid| DMD (critic: flow matching) |
| self_forcing      | causal model + critic  | its own KV-cache rollout (Algorithm 1)    | DMD, SiD or GAN |

Batches are dicts: ``latents`` [B, F, C, H, W], ``context`` / ``null_context`` [B, L, D] (text states of the
prompt and of the unconditional prompt), ``ode_states`` [B, S + 1, F, C, H, W] (ODE init only).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn as nn

from .. import flow
from ..sampling import predict_x0, rollout_with_kv_cache, sample_exit_steps
from . import losses
from .config import TrainConfig
from .distributed import broadcast_object


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters of ``model`` do not require grad inside (gradient still flows through its inputs)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


class DiscriminatorHead(nn.Module):
    """GAN head on the critic's features: per tapped layer, a learned query attends over the video tokens
    (attention pooling); the pooled vectors are concatenated and an MLP gives one logit per sample.

    features: {layer: tokens [B, N, D]} -> logits [B]."""

    def __init__(self, dim: int, num_layers: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.queries = nn.Parameter(torch.randn(num_layers, dim) * 0.02)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_layers)])
        self.keys = nn.ModuleList([nn.Linear(dim, dim) for _ in range(num_layers)])
        self.mlp = nn.Sequential(nn.LayerNorm(num_layers * dim), nn.Linear(num_layers * dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for i, layer in enumerate(sorted(features)):
            h = self.norms[i](features[layer].float())
            scores = (self.keys[i](h) @ self.queries[i]) / h.shape[-1] ** 0.5  # [B, N]
            pooled.append((scores.softmax(-1)[..., None] * h).sum(1))
        return self.mlp(torch.cat(pooled, -1)).squeeze(-1)


class GANCritic(nn.Module):
    """Discriminator = the critic backbone (bidirectional) + :class:`DiscriminatorHead`. D(x_t, t, ctx) -> [B]."""

    def __init__(self, backbone: nn.Module, layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        n = backbone.config.num_layers
        self.layers = tuple(layers) or tuple(sorted({n - 1, max(0, 2 * n // 3 - 1), max(0, n // 3 - 1)}))
        self.backbone = backbone
        self.head = DiscriminatorHead(backbone.dim, len(self.layers))

    def forward(self, x_t, t, context):
        _, feats = self.backbone(x_t, t, context, causal=False, output_hidden_layers=self.layers)
        return self.head(feats)


class TrainingMethod:
    """Base class: one trainable ``generator``; subclasses add critics and frozen teachers."""

    def __init__(self, cfg: TrainConfig, generator: nn.Module, teacher: nn.Module | None = None,
                 critic: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.generator = generator
        self.teacher = teacher
        self.critic = critic

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def update_schedule(self, step: int) -> list[str]:
        """Names of the networks updated at ``step``, in order."""
        return ["generator"]

    def loss(self, name: str, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # ---- shared pieces
    def _timesteps(self, rng, shape=(), shift=None) -> torch.Tensor:
        """Training timesteps [B, *shape] of the flow-matching losses from the batch's per-sample streams:
        the recipe's distribution (``timestep_sampling``), then its shift."""
        c = self.cfg
        return flow.training_timesteps(rng.rand(shape), distribution=c.timestep_sampling,
                                       shift=c.timestep_shift if shift is None else shift,
                                       mean=c.logit_normal_mean, std=c.logit_normal_std)

    def _blocked(self, per_block: torch.Tensor, num_frames: int) -> torch.Tensor:
        return flow.blockwise_timesteps(per_block, self.generator.block_sizes(num_frames))

    def _num_blocks(self, num_frames: int) -> int:
        return len(self.generator.block_sizes(num_frames))

    def _steps(self) -> list[float]:
        r = self.cfg.rollout
        return flow.denoising_step_list(r.denoising_steps, shift=self.cfg.timestep_shift,
                                        warp=r.warp_denoising_step).tolist()


class TeacherPretraining(TrainingMethod):
    """Bidirectional flow matching: t ~ the recipe's timestep distribution per clip,
    L = ||v(x_t, t, c) - (eps - x0)||^2, with the prompt replaced by the unconditional one with probability
    ``text_dropout`` (so CFG works later).

    Image-video joint training: when the batch also holds ``image_latents`` [Bi, 1, C, h, w] (single frames, with
    ``image_context``, their own ``image_rng`` and ``image_start_frame``, the frame they are of), the loss is
    L_clips + image_loss_weight * L_images, each a mean over its own elements. A 1-frame video costs
    1/F of a clip's forward, so a step sees many more digits."""

    def _flow_loss(self, x0, ctx, null, rng, start_frame=0):
        drop = (rng.rand() < self.cfg.text_dropout).to(x0.device)
        ctx = torch.where(drop[:, None, None], null, ctx)
        t = self._timesteps(rng).to(x0.device)
        eps = rng.randn_like(x0)
        v = self.generator(flow.add_noise(x0, eps, t), t, ctx, causal=False, start_frame=start_frame)
        return losses.flow_matching_loss(v, x0, eps)

    def loss(self, name, batch):
        loss = self._flow_loss(batch["latents"], batch["context"], batch["null_context"], batch["rng"])
        logs = {"loss": loss.item()}
        if "image_latents" in batch:
            image_loss = self._flow_loss(batch["image_latents"], batch["image_context"], batch["image_null_context"],
                                         batch["image_rng"], batch.get("image_start_frame", 0))
            logs["image_loss"] = image_loss.item()
            loss = loss + self.cfg.data.image_loss_weight * image_loss
        return loss, logs


class DiffusionForcing(TrainingMethod):
    """Causal flow matching with an independent t per block (block-causal mask): noisy context."""

    def loss(self, name, batch):
        x0, ctx = batch["latents"], batch["context"]
        nf, rng = x0.shape[1], batch["rng"]
        t = self._blocked(self._timesteps(rng, (self._num_blocks(nf),)), nf).to(x0.device)
        eps = rng.randn_like(x0)
        v = self.generator(flow.add_noise(x0, eps, t), t, ctx, causal=True)
        loss = losses.flow_matching_loss(v, x0, eps)
        return loss, {"loss": loss.item()}


class TeacherForcing(TrainingMethod):
    """Causal flow matching where block i sees the clean blocks < i (teacher-forcing layout); the clean context
    is optionally noised to t = ``context_noise`` (noise augmentation)."""

    def loss(self, name, batch):
        x0, ctx = batch["latents"], batch["context"]
        (b, nf), rng = x0.shape[:2], batch["rng"]
        t = self._blocked(self._timesteps(rng, (self._num_blocks(nf),)), nf).to(x0.device)
        eps = rng.randn_like(x0)
        ct = torch.full((b, nf), float(self.cfg.context_noise), device=x0.device)
        clean = flow.add_noise(x0, rng.randn_like(x0), ct) if self.cfg.context_noise > 0 else x0
        v = self.generator(flow.add_noise(x0, eps, t), t, ctx, clean_x=clean, clean_timestep=ct)
        loss = losses.flow_matching_loss(v, x0, eps)
        return loss, {"loss": loss.item()}


def gather_few_step_inputs(states: torch.Tensor, steps: list[float], block_sizes: list[int], rng):
    """Per block, pick one few-step state index k ~ U{0..S-1}: x_in [B, F, ...] = states[:, k_b], t = steps[k_b].

    states [B, S + 1, F, C, H, W] are the states at ``steps`` followed by the clean end point."""
    b, s1, nf = states.shape[:3]
    per_block = rng.randint(len(steps), (len(block_sizes),)).to(states.device)
    idx = flow.blockwise_timesteps(per_block, block_sizes)  # [B, F]
    gather = idx[:, None, :, None, None, None].expand(b, 1, nf, *states.shape[3:])
    x_in = states.gather(1, gather).squeeze(1)
    t = torch.as_tensor(steps, device=states.device, dtype=torch.float32)[idx]
    return x_in, t


class ODEInit(TrainingMethod):
    """ODE-regression initialisation (CausVid): the causal student maps the teacher's ODE state at a few-step
    timestep (one per block) to the ODE's clean end point in one block-causal forward."""

    def loss(self, name, batch):
        states, ctx = batch["ode_states"], batch["context"]
        nf = states.shape[2]
        x_in, t = gather_few_step_inputs(states, self._steps(), self.generator.block_sizes(nf), batch["rng"])
        x0 = predict_x0(self.generator, x_in, t, ctx, causal=True)
        loss = losses.ode_regression_loss(x0, states[:, -1])
        return loss, {"loss": loss.item()}


class DistributionMatching(TrainingMethod):
    """Generator + critic, alternating: the critic every step, the generator every
    ``critic_updates_per_generator_update`` steps (first). Subclasses say how generator samples are produced
    (:meth:`generate`)."""

    def trainable(self):
        return {"generator": self.generator, "critic": self.critic}

    def update_schedule(self, step):
        ratio = self.cfg.dm.critic_updates_per_generator_update
        return (["generator"] if step % ratio == 0 else []) + ["critic"]

    def generate(self, batch, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator samples [B, F, ...] and a frame mask [B, F] of supervised frames (None = all)."""
        raise NotImplementedError

    def _score_t(self, rng, x):
        """t ~ shift(U[0, 1000)) per sample, clamped to [min_timestep, max_timestep] (as the reference DMD)."""
        dm = self.cfg.dm
        u = rng.rand()  # the score's t is always the shifted uniform of the reference DMD, whatever the recipe's
        t = flow.timesteps_from_uniform(u, shift=dm.timestep_shift)
        return t.clamp(dm.min_timestep, dm.max_timestep).to(x.device)

    def _real_x0(self, x_t, t, batch):
        cond = predict_x0(self.teacher, x_t, t, batch["context"], causal=False)
        if self.cfg.dm.guidance_scale == 1.0:
            return cond
        uncond = predict_x0(self.teacher, x_t, t, batch["null_context"], causal=False)
        return losses.classifier_free_guidance(cond, uncond, self.cfg.dm.guidance_scale)

    def loss(self, name, batch):
        if name == "generator":
            return self.generator_loss(batch)
        return self.critic_loss(batch)

    def generator_loss(self, batch):
        dm = self.cfg.dm
        rng = batch["rng"]
        x, mask = self.generate(batch, with_grad=True)
        t = self._score_t(rng, x)
        eps = rng.randn_like(x)
        if dm.loss == "dmd":
            with torch.no_grad():
                x_t = flow.add_noise(x.detach(), eps, t)
                fake = predict_x0(self.critic, x_t, t, batch["context"], causal=False)
                real = self._real_x0(x_t, t, batch)
            loss, g = losses.dmd_generator_loss(x, real, fake, mask)
            return loss, {"generator_loss": loss.item(), "dmd_gradient_norm": float(g.abs().mean())}
        if dm.loss == "sid":
            x_t = flow.add_noise(x, eps, t)  # gradient flows through x_t into both score networks' inputs
            with _frozen(self.critic):
                fake = predict_x0(self.critic, x_t, t, batch["context"], causal=False)
            real = self._real_x0(x_t, t, batch)
            loss = losses.sid_generator_loss(x, real, fake, alpha=dm.sid_alpha)
            return loss, {"generator_loss": loss.item()}
        x_t = flow.add_noise(x, eps, t)  # gan
        with _frozen(self.critic):
            logits = self.critic(x_t, t, batch["context"])
        loss = dm.gan_generator_weight * losses.gan_generator_loss(logits)
        return loss, {"generator_loss": loss.item(), "d_fake": logits.detach().mean().item()}

    def critic_loss(self, batch):
        dm = self.cfg.dm
        rng = batch["rng"]
        with torch.no_grad():
            x, _ = self.generate(batch, with_grad=False)
        t = self._score_t(rng, x)
        eps = rng.randn_like(x)
        x_t = flow.add_noise(x, eps, t)
        if dm.loss in ("dmd", "sid"):
            v = self.critic(x_t, t, batch["context"], causal=False)
            loss = losses.critic_denoising_loss(v, x, eps)
            return loss, {"critic_loss": loss.item()}
        real = batch["latents"]  # gan: real clips (same t, fresh noise)
        if real.shape != x.shape:
            raise ValueError(f"GAN needs real latents of the generated shape {tuple(x.shape)}, got {tuple(real.shape)}")
        real_t = flow.add_noise(real, rng.randn_like(real), t)
        d_real = self.critic(real_t, t, batch["context"])
        d_fake = self.critic(x_t, t, batch["context"])
        loss = dm.gan_discriminator_weight * losses.gan_discriminator_loss(d_real, d_fake)
        logs = {"d_real": d_real.detach().mean().item(), "d_fake": d_fake.detach().mean().item()}
        if dm.r1_weight > 0:
            d_pert = self.critic(real_t + dm.r1_sigma * rng.randn_like(real_t), t, batch["context"])
            r1 = losses.r1_penalty(d_real, d_pert, dm.r1_sigma)
            loss = loss + dm.r1_weight * r1
            logs["r1"] = r1.item()
        logs["critic_loss"] = loss.item()
        return loss, logs


class CausVid(DistributionMatching):
    """DMD on diffusion-forcing inputs (no self-rollout): data latents noised per block at a few-step timestep,
    denoised in one block-causal forward."""

    def generate(self, batch, with_grad):
        x0, rng = batch["latents"], batch["rng"]
        steps = self._steps()
        eps = rng.randn_like(x0)
        noisy = torch.stack([flow.add_noise(x0, eps, torch.full(x0.shape[:2], s, device=x0.device)) for s in steps], 1)
        x_in, t = gather_few_step_inputs(torch.cat([noisy, x0[:, None]], 1), steps,
                                         self.generator.block_sizes(x0.shape[1]), rng)
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            return predict_x0(self.generator, x_in, t, batch["context"], causal=True), None


class SelfForcing(DistributionMatching):
    """Self Forcing (Algorithm 1): the generator's own KV-cache rollout, gradient only at one exit step per chunk
    (drawn on rank 0, broadcast), optionally longer than the supervised window."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exit_history: list[list[int]] = []  # the exit steps of every rollout (logged, and checked in tests)

    def rollout_shape(self, batch) -> tuple[int, ...]:
        ref = batch["latents"] if "latents" in batch else None
        if ref is not None:
            b, nf, c, h, w = ref.shape
        else:
            nf, c, h, w = self.cfg.data.latent_shape
            b = batch["context"].shape[0]
        nf = self.cfg.rollout.num_rollout_frames or nf
        return b, nf, c, h, w

    def supervised_window(self, num_frames: int) -> tuple[int, int]:
        """(rollout length R, supervised frames N) of this iteration: the rollout generates frames [0, R) and the
        scores judge [R - N, R). "last": R = num_frames. "random": R - N ~ Uniform over the chunk boundaries b with
        b + N <= num_frames (drawn on rank 0, broadcast), so a long-horizon recipe trains every position of the
        stream, its start included, at the cost of the frames up to the window only."""
        r = self.cfg.rollout
        n_sup = r.supervised_frames or num_frames
        if r.supervised_window == "last":
            return num_frames, n_sup
        blocks = self.generator.block_sizes(num_frames)
        bounds = [0, *itertools.accumulate(blocks)]  # the chunk boundaries, num_frames the last
        starts = [b for b in bounds if b + n_sup in bounds]
        if not starts:
            raise ValueError(f"no chunk-aligned window of {n_sup} frames in a {num_frames}-frame rollout with "
                             f"chunks {blocks}")
        start = broadcast_object(starts[int(torch.randint(len(starts), ()))])
        return start + n_sup, n_sup

    def generate(self, batch, with_grad):
        r = self.cfg.rollout
        _, nf, *latent = self.rollout_shape(batch)
        nf, n_sup = self.supervised_window(nf)
        device = batch["context"].device
        block_sizes = self.generator.block_sizes(nf)
        steps = self._steps()
        # drawn on rank 0 and broadcast: every rank runs the same forwards (FSDP collectives stay in step)
        exits = broadcast_object(sample_exit_steps(len(block_sizes), len(steps),
                                                   same_step_across_blocks=r.same_step_across_blocks,
                                                   last_step_only=r.last_step_only))
        self.exit_history.append(exits)
        rng = batch["rng"]
        noise = rng.randn((nf, *latent)).to(device)
        # the generator's own cache: its config's rolling window and sinks, if any, as at inference
        res = rollout_with_kv_cache(self.generator, noise, batch["context"], steps, block_sizes=block_sizes,
                                    exit_steps=exits, grad_from_frame=nf - n_sup,
                                    context_noise=r.context_noise, generator=rng)
        # the scores judge the supervised window only
        return res.video[:, nf - n_sup:], None


METHOD_CLASSES = {
    "teacher": TeacherPretraining,
    "diffusion_forcing": DiffusionForcing,
    "teacher_forcing": TeacherForcing,
    "ode_init": ODEInit,
    "causvid": CausVid,
    "self_forcing": SelfForcing,
}


def needs_teacher(cfg: TrainConfig) -> bool:
    return cfg.method in ("causvid", "self_forcing") and not (cfg.method == "self_forcing" and cfg.dm.loss == "gan")


def needs_critic(cfg: TrainConfig) -> bool:
    return cfg.method in ("causvid", "self_forcing")
