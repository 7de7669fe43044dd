"""The Wan2.1 video DiT, made block-causal, with a KV cache: one module for every mode.

Modes of :meth:`CausalWanModel.forward` (latents are always [B, F, C, H, W]):

* bidirectional (``causal=False``): full attention over all frames, exactly
  ``diffusers.WanTransformer3DModel`` (the teacher, the DMD real/fake scores);
* block-causal (``causal=True``): frames in blocks of ``num_frame_per_block``; a block attends to
  itself and to earlier blocks (inside the rolling window with sinks, if configured);
* teacher forcing (``clean_x=...``): the clean frames and the noisy frames in one sequence, each noisy
  block attending to the clean blocks before it and to itself;
* KV cache (``kv_cache=...``): one chunk at a time, attending to the cached earlier frames; ``kv_only`` for a
  cache pass alone, ``pending_x`` to run the previous chunk's cache pass in the same forward (fused).

A forward is a plan (:class:`ForwardPlan`: the sequence, how every layer attends, the conditioning), the blocks and
the head. Every frame gets its own adaLN modulation from its own timestep ([B, F] timesteps). State-dict keys and
shapes are those of ``diffusers.WanTransformer3DModel`` with the same config, so weights move between the two with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .attention import (
    CachedAttention,
    ContextAttention,
    FullAttention,
    SelfAttention,
    block_causal_frame_mask,
    block_sizes_for,
    expand_frame_mask,
    teacher_forcing_frame_mask,
)
from .blocks import CausalWanBlock, ConditionEmbedder, WanRotaryEmbedding, fp32_layer_norm, timestep_sinusoid
from .kv_cache import ChunkPlan, KVCache
from .presets import PRESETS, preset_config
from .runtime import accelerator, cpu_inference
from .state_dict_adapter import load_checkpoint_file


@dataclass
class ForwardPlan:
    """One forward, laid out: the latents in sequence order (a fused finished chunk, or teacher forcing's clean
    frames, before ``x``), their per-frame timesteps [B, N_frames], how every layer's self-attention sees its keys,
    the RoPE table, and the conditioning (modulation ``e`` [B, N_frames, 6, D], ``temb`` [B, N_frames, D], the text
    embedding ``ctx`` or the per-layer cross-attention cache slots ``cross``)."""

    latents: list[torch.Tensor]
    t: torch.Tensor
    height: int  # latent height and width of x
    width: int
    tokens_per_frame: int
    attn: list[SelfAttention] = field(default_factory=list)
    n_pending: int = 0  # frames of a fused finished chunk at the front
    teacher_forcing: bool = False
    kv_only: bool = False
    taps: set[int] | None = None  # blocks whose output tokens are returned too
    tracking: bool = False  # autograd records this forward
    kv_cache: KVCache | None = None
    chunk: ChunkPlan | None = None  # the cache plan of x, committed once the forward has run
    rope: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # added to the tokens: absolute embeddings [N, D], a caption layout [B, N, D]
    e: torch.Tensor | None = None
    temb: torch.Tensor | None = None
    ctx: torch.Tensor | None = None
    cross: list = field(default_factory=list)

    @property
    def frames(self) -> int:
        """F, the frames of x (the frames the output has)."""
        return self.latents[-1].shape[1]

    def finish(self) -> None:
        """Record in the cache that the chunk was written (a forward with gradients writes nothing)."""
        if self.chunk is not None and not self.tracking:
            self.kv_cache.commit(self.chunk)


# Wan's positions are all relative (3-D RoPE, a patch embedding without padding): given pure noise, a small model then
# cannot say where the top of the frame is, nor which frame comes first, so it cannot put a digit where its caption's
# motion starts (Wan2.1 learns it from its data, with an anchor from its causal VAE, whose first latent frame encodes
# one image). Learned absolute embeddings, of the frame index and of the token's place in a fixed grid, give it both.
ABSOLUTE_EMBEDDING_KEYS = ("frame_embedding", "spatial_embedding")

# A caption's direction ("moves up") says where the digit is in each frame: a layout the text must choose, which a
# small model learns slowly or not at all through cross-attention alone (docs/tiny_model.md, direction_overfit).
# The caption layout is a low-rank, caption-weighted map added to the tokens, scaled by each frame's noise level:
#   bias[b, f, i, j] = sigma_f sum_r w_r(mean_l context[b, l]) M_r[f, i, j] u_r.
# Its vectors u start at zero, so adding it to trained weights changes nothing until it is trained.
CAPTION_LAYOUT_KEYS = ("caption_layout.weight", "caption_layout.bias", "caption_layout_maps", "caption_layout_vectors")


def _check_config(patch_size, qk_norm, num_frame_per_block, local_attn_size, sink_size, num_frame_embeddings,
                  spatial_embedding_grid, caption_layout_rank, caption_layout_size) -> None:
    """Raise ValueError on a :class:`CausalWanModel` config this model cannot run."""
    if len(patch_size) != 3 or patch_size[0] != 1:
        raise ValueError(f"patch_size must be (1, p_h, p_w) (one latent frame per token row), got {patch_size}")
    if qk_norm != "rms_norm_across_heads":
        raise ValueError(f"only qk_norm='rms_norm_across_heads' (Wan2.1) is supported, got {qk_norm!r}")
    if num_frame_per_block < 1:
        raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
    if local_attn_size > 0 and not 0 <= sink_size < local_attn_size:
        raise ValueError(f"need 0 <= sink_size < local_attn_size, got {sink_size}, {local_attn_size}")
    if local_attn_size > 0 and local_attn_size - sink_size < num_frame_per_block:
        raise ValueError(
            f"the attention window minus sinks ({local_attn_size} - {sink_size}) must hold a whole block "
            f"of {num_frame_per_block} frames"
        )
    if local_attn_size <= 0 and sink_size:
        raise ValueError("sink_size needs a rolling window (local_attn_size > 0)")
    if num_frame_embeddings < 0:
        raise ValueError(f"num_frame_embeddings must be >= 0, got {num_frame_embeddings}")
    if spatial_embedding_grid is not None:
        gh, gw = (int(v) for v in spatial_embedding_grid)
        if gh < 1 or gw < 1:
            raise ValueError(f"spatial_embedding_grid must be (h, w) tokens >= 1, got {spatial_embedding_grid}")
    if caption_layout_rank and (caption_layout_rank < 0 or caption_layout_size is None
                                or len(caption_layout_size) != 3 or min(int(v) for v in caption_layout_size) < 1):
        raise ValueError(f"caption_layout_rank={caption_layout_rank} needs a rank >= 1 and caption_layout_size "
                         f"(frames, h, w) >= 1, got {caption_layout_size}")


def _grid_sinusoid(grid, dim: int) -> torch.Tensor:
    """[h * w, dim]: row i's sin-cos code in the first dim // 2 channels, column j's in the rest (row-major)."""
    gh, gw = (int(v) for v in grid)
    rows, cols = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    return torch.cat([timestep_sinusoid(rows, dim // 2), timestep_sinusoid(cols, dim - dim // 2)], -1)


# The config's defaults are Wan2.1-T2V-1.3B's (presets.py): a diffusers config.json that leaves a field out loads
# as that model.
_DEFAULTS = PRESETS["wan2.1-t2v-1.3b"]


class CausalWanModel(ModelMixin, ConfigMixin):
    r"""Block-causal Wan2.1 DiT with per-frame timesteps and a KV cache.

    Config fields are those of ``diffusers.WanTransformer3DModel`` plus the causal ones:
    ``num_frame_per_block`` (K, frames per chunk), ``local_attn_size`` (attention window L in latent
    frames, -1 = unbounded), ``sink_size`` (S frames at the start of the video kept in the window) and
    ``independent_first_frame`` (blocks [1, K, K, ...]); and two that Wan's presets leave off (see
    ``ABSOLUTE_EMBEDDING_KEYS``): ``num_frame_embeddings`` K (frame f's tokens get a learned E_t[min(f, K - 1)]) and
    ``spatial_embedding_grid`` (h, w) (the token at row i, column j of every frame gets a learned E_s[i, j]; the
    token grid may then be at most h x w). Both start as sin-cos tables (as DiT's) and are added after the patch
    embedding. ``caption_layout_rank`` R > 0 with ``caption_layout_size`` (K, h, w) adds a caption-chosen layout (see
    ``CAPTION_LAYOUT_KEYS``) to the tokens of frames f < K on a token grid of at most h x w, scaled by each frame's
    noise level; later frames get none (the layout says where a video starts).

    Shapes: latents ``x`` [B, F, C, H, W]; ``timestep`` [B] (shared by all frames) or [B, F] in
    [0, 1000]; ``context`` [B, L, text_dim]; output: the flow prediction v = eps - x0, [B, F, C_out, H, W].
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CausalWanBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = _DEFAULTS["patch_size"],
        num_attention_heads: int = _DEFAULTS["num_attention_heads"],
        attention_head_dim: int = _DEFAULTS["attention_head_dim"],
        in_channels: int = _DEFAULTS["in_channels"],
        out_channels: int = _DEFAULTS["out_channels"],
        text_dim: int = _DEFAULTS["text_dim"],
        freq_dim: int = _DEFAULTS["freq_dim"],
        ffn_dim: int = _DEFAULTS["ffn_dim"],
        num_layers: int = _DEFAULTS["num_layers"],
        cross_attn_norm: bool = _DEFAULTS["cross_attn_norm"],
        qk_norm: str | None = _DEFAULTS["qk_norm"],
        eps: float = _DEFAULTS["eps"],
        rope_max_seq_len: int = _DEFAULTS["rope_max_seq_len"],
        num_frame_per_block: int = _DEFAULTS["num_frame_per_block"],
        local_attn_size: int = -1,
        sink_size: int = 0,
        independent_first_frame: bool = False,
        num_frame_embeddings: int = 0,
        spatial_embedding_grid: tuple[int, int] | None = None,
        caption_layout_rank: int = 0,
        caption_layout_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        _check_config(patch_size, qk_norm, num_frame_per_block, local_attn_size, sink_size, num_frame_embeddings,
                      spatial_embedding_grid, caption_layout_rank, caption_layout_size)
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # submodules in this order: random initialisation draws from the global generator in it
        self.rope = WanRotaryEmbedding(attention_head_dim)
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim)
        self.frame_embedding = self.spatial_embedding = None  # absolute positions (ABSOLUTE_EMBEDDING_KEYS)
        if num_frame_embeddings:
            self.frame_embedding = nn.Parameter(timestep_sinusoid(torch.arange(num_frame_embeddings), dim))
        if spatial_embedding_grid is not None:
            self.spatial_embedding = nn.Parameter(_grid_sinusoid(spatial_embedding_grid, dim))
        self.caption_layout = self.caption_layout_maps = self.caption_layout_vectors = None  # CAPTION_LAYOUT_KEYS
        if caption_layout_rank:
            self.caption_layout = nn.Linear(text_dim, caption_layout_rank)
            self.caption_layout_maps = nn.Parameter(0.5 * torch.randn(caption_layout_rank,
                                                                      *map(int, caption_layout_size)))
            self.caption_layout_vectors = nn.Parameter(torch.zeros(caption_layout_rank, dim))
        self.blocks = nn.ModuleList(
            [CausalWanBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> CausalWanModel:
        """Build a randomly initialised model from a named preset (see ``presets.py``)."""
        return cls(**preset_config(name, **overrides))

    @classmethod
    def from_checkpoint(
        cls, path: str, *, preset: str | None = None, use_ema: bool = False, **overrides
    ) -> CausalWanModel:
        """Load weights from a ``save_pretrained`` directory, or from a checkpoint file in any format of
        ``state_dict_adapter`` (native, original Wan / CausVid / Self Forcing, wrapped or not). Our training
        checkpoints record their architecture; any other file needs ``preset`` (plus ``overrides``) to say which
        architecture it holds."""
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if os.path.isfile(cfg_path):
                try:
                    with open(cfg_path, encoding="utf-8") as fh:
                        config = json.load(fh)
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
                if isinstance(config, dict) and "_class_name" in config:  # a diffusers folder (ours or Wan's)
                    return cls._from_pretrained_folder(path, **overrides)
            # an original Wan2.1 release folder: weights in (sharded) safetensors, original key names
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path}: neither a diffusers config.json nor *.safetensors weights")
            files = [os.path.join(path, f) for f in shards]
        else:
            files = [path]
        state, architecture = {}, None
        for f in files:
            part, architecture = load_checkpoint_file(f, use_ema=use_ema, with_architecture=True)
            state.update(part)
        if architecture is not None:  # our training checkpoint records the generator's config: it wins over a preset
            model = cls(**{**architecture, **overrides})
        elif preset is None:
            raise ValueError(f"loading {path} needs preset=... (it holds weights, not a diffusers config)")
        else:
            model = cls.from_preset(preset, **overrides)
        model.load_weights(state, source=path)
        return model

    @classmethod
    def _from_pretrained_folder(cls, path: str, **overrides) -> CausalWanModel:
        """``from_pretrained`` of a diffusers folder; a folder without weights (an export cut short) or with
        unreadable ones is a ValueError naming the folder."""
        names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise ValueError(f"{path}: has config.json but no weights (diffusion_pytorch_model.safetensors): an "
                             f"incomplete save_pretrained folder")
        try:
            saved = cls.from_pretrained(path)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: cannot load the save_pretrained folder ({' '.join(str(err).split())})") from err
        # overrides may add parameters the folder lacks (CAPTION_LAYOUT_KEYS), which diffusers would leave on the meta
        # device: they are applied after loading instead
        return saved.with_overrides(source=path, **overrides) if overrides else saved

    def with_overrides(self, *, source: str = "the model", **overrides) -> CausalWanModel:
        """A new model of this config with ``overrides`` applied, holding these weights (:meth:`load_weights`' rules:
        an added caption layout or absolute embeddings start as the same function; any other mismatch is a
        ValueError naming ``source``)."""
        model = type(self)(**{**{k: v for k, v in self.config.items() if not k.startswith("_")}, **overrides})
        model.load_weights(self.state_dict(), source=source)
        return model

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of a native state dict; mismatches raise ValueError naming the keys and shapes. One exception:
        weights saved without absolute position embeddings or a caption layout load into a model with them (the
        embeddings stay zero, the layout keeps its initialisation, whose zero vectors add nothing: the same
        function)."""
        own = self.state_dict()
        absent = {k: torch.zeros_like(own[k]) for k in ABSOLUTE_EMBEDDING_KEYS if k in own and k not in state_dict}
        if not any(k in state_dict for k in CAPTION_LAYOUT_KEYS):
            absent.update({k: own[k] for k in CAPTION_LAYOUT_KEYS if k in own})
        if absent:
            state_dict = {**state_dict, **absent}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not fit this model config: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shapes {wrong[:5]} ({len(wrong)})"
            )
        self.load_state_dict(state_dict, strict=True)

    @property
    def dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_height // ph) * (latent_width // pw)

    def new_kv_cache(
        self,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        *,
        max_frames: int | None = None,
        window_frames: int | None = None,
        sink_frames: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache sized for this model; window/sinks default to the config's local_attn_size/sink_size."""
        window = self.config.local_attn_size if window_frames is None else window_frames
        sink = self.config.sink_size if sink_frames is None else sink_frames
        p = next(self.parameters())
        return KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame(latent_height, latent_width),
            max_frames=max_frames,
            window_frames=window,
            sink_frames=sink if window and window > 0 else 0,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    def block_sizes(self, num_frames: int) -> list[int]:
        """Causal block layout of a ``num_frames`` clip (ValueError if K does not divide it)."""
        return block_sizes_for(num_frames, self.config.num_frame_per_block, self.config.independent_first_frame)

    # ------------------------------------------------------------------ forward: plan, blocks, head
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        causal: bool = True,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        clean_x: torch.Tensor | None = None,
        clean_timestep: torch.Tensor | None = None,
        output_hidden_layers: tuple[int, ...] | None = None,
        kv_only: bool = False,
        pending_x: torch.Tensor | None = None,
        pending_timestep: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        r"""Flow prediction v for latents ``x``.

        Args:
            x: latents [B, F, C, H, W] (with ``kv_cache``: the F frames of one chunk).
            timestep: [B] or [B, F], t in [0, 1000]; each frame is modulated by its own t.
            context: text states [B, L, text_dim] (zero-padded, attended without a mask, as Wan does).
            causal: block-causal attention (True) or full bidirectional attention (False).
            kv_cache: process ``x`` as the chunk of frames [start_frame, start_frame + F) against the
                cached earlier frames. Without gradients the chunk's K/V are written into the cache
                (re-running the same chunk overwrites them); with gradients nothing is written.
            start_frame: absolute index of the first frame of ``x`` (sets its RoPE position).
            clean_x: teacher forcing: clean latents [B, F, C, H, W] placed before ``x`` in one sequence;
                noisy block i sees the clean blocks < i and itself. Only the noisy half is returned.
            clean_timestep: [B] or [B, F] timesteps of ``clean_x`` (default 0).
            output_hidden_layers: also return the hidden tokens [B, N, D] after these blocks (0-based;
                negative counts from the end), e.g. for a discriminator head on the critic's features.
            kv_only: with ``kv_cache`` and no gradients, only write the chunk's K/V (the cache pass of Algorithms
                1 and 2, whose prediction is discarded): the last block stops after its K/V projection, the
                head is skipped, and None is returned. The cache ends up exactly as after a full forward.
            pending_x: with ``kv_cache`` and no gradients, a finished chunk [B, F', C, H, W] (frames
                [start_frame - F', start_frame)) whose cache pass runs fused with this forward: its tokens go first
                in one sequence, write their K/V (as ``kv_only`` would) and are attended by ``x``. One pass over
                both chunks' tokens costs less than two on CPU (bigger matmuls, half the per-layer overhead); the
                cache and the output equal the two separate passes up to float rounding. Same context for both.
            pending_timestep: [B] or [B, F'] timesteps of ``pending_x`` (default 0: the clean chunk).

        Returns:
            v = eps - x0 predicted for ``x``: [B, F, C_out, H, W] (and {layer: tokens} if asked).
        """
        plan = self.plan_forward(x, timestep, context, causal=causal, kv_cache=kv_cache, start_frame=start_frame,
                                 clean_x=clean_x, clean_timestep=clean_timestep,
                                 output_hidden_layers=output_hidden_layers, kv_only=kv_only, pending_x=pending_x,
                                 pending_timestep=pending_timestep)
        acc = accelerator()
        out, hidden = (NotImplemented if acc is None or not cpu_inference(x) else acc.forward(self, plan)), {}
        if out is NotImplemented:
            tokens, hidden = self.run_blocks(plan)
            out = None if kv_only else self.head(tokens, plan)
        plan.finish()
        return (out, hidden) if output_hidden_layers is not None else out

    def plan_forward(self, x, timestep, context, *, causal=True, kv_cache=None, start_frame=0, clean_x=None,
                     clean_timestep=None, output_hidden_layers=None, kv_only=False, pending_x=None,
                     pending_timestep=None) -> ForwardPlan:
        """Check the inputs of :meth:`forward` (same arguments), lay the sequence out, choose how every layer
        attends, and condition: a :class:`ForwardPlan`."""
        tracking = self._tracks_grad(x)
        self._check_forward(x, timestep, context, causal, kv_cache, start_frame, clean_x, output_hidden_layers,
                            kv_only, pending_x, tracking)
        b, nf, _, hh, ww = x.shape
        plan = ForwardPlan([x], self._frame_timesteps(timestep, b, nf), hh, ww, self.tokens_per_frame(hh, ww),
                           kv_only=kv_only, tracking=tracking, kv_cache=kv_cache,
                           taps=None if output_hidden_layers is None else {
                               i % self.config.num_layers for i in output_hidden_layers})
        if kv_cache is not None:
            self._plan_cached(plan, start_frame, pending_x, pending_timestep)
        elif clean_x is not None:
            self._plan_teacher_forcing(plan, clean_x, clean_timestep)
        else:
            plan.attn = self._full_attention(nf, plan.tokens_per_frame, causal, x.device)
        _, ph, pw = self.config.patch_size
        # the sequence's frames [first, first + frames) on an h x w token grid, twice over for teacher forcing
        first, frames, grid = start_frame - plan.n_pending, plan.n_pending + nf, (hh // ph, ww // pw)
        repeats = 2 if plan.teacher_forcing else 1
        plan.rope = self.rope.table(first, frames, *grid, x.device, repeats=repeats)
        plan.positions = self._absolute_positions(first, frames, grid, repeats=repeats)
        layout = self._caption_layout(context, first, frames, grid, plan.t)
        if layout is not None:
            plan.positions = layout if plan.positions is None else layout + plan.positions
        self._condition(plan, context)
        return plan

    def run_blocks(self, plan: ForwardPlan) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Patch-embed the planned latents and run the transformer blocks: (tokens [B, N, D], {block: tokens})."""
        latents = plan.latents
        tokens = self._patchify(latents[0]) if len(latents) == 1 else torch.cat(
            [self._patchify(lat) for lat in latents], dim=1)
        if plan.positions is not None:
            tokens = tokens + plan.positions.to(tokens.dtype)
        ckpt = torch.is_grad_enabled() and self.gradient_checkpointing
        last, hidden = self.config.num_layers - 1, {}
        for i, (blk, how, ckv) in enumerate(zip(self.blocks, plan.attn, plan.cross)):
            if plan.kv_only and i == last:
                blk(tokens, plan.e, plan.rope, how, plan.ctx, ckv, kv_only=True)
            elif ckpt:
                tokens = self._gradient_checkpointing_func(blk, tokens, plan.e, plan.rope, how, plan.ctx, ckv)
            else:
                tokens = blk(tokens, plan.e, plan.rope, how, plan.ctx, ckv)
            if plan.taps and i in plan.taps:
                hidden[i] = tokens
        return tokens, hidden

    def head(self, tokens: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """The output head on the blocks' tokens: per-frame shift/scale, projection, unpatchify; v [B, F, C, H, W]."""
        b, nf, tpf = tokens.shape[0], plan.frames, plan.tokens_per_frame
        temb = plan.temb[:, plan.n_pending:]  # the last block kept only x's tokens (and a teacher's clean ones)
        mod = (self.scale_shift_table[None] + temb[:, :, None, :].float()).unsqueeze(3)  # [B, F, 2, 1, D]
        shift, scale = mod.unbind(2)
        tf = tokens.view(b, temb.shape[1], tpf, -1)
        out = (fp32_layer_norm(tf, self.norm_out) * (1 + scale) + shift).type_as(tokens)
        out = self.proj_out(out)
        if plan.teacher_forcing:
            out = out[:, nf:]
        return self._unpatchify(out.reshape(b, nf * tpf, -1), nf, plan.height, plan.width)

    # ------------------------------------------------------------------ pieces of the plan
    def _check_forward(self, x, timestep, context, causal, kv_cache, start_frame, clean_x, output_hidden_layers,
                       kv_only, pending_x, tracking) -> None:
        """ValueError for inputs that do not fit the model or contradict each other."""
        self._check_latents(x)
        b = x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.config.text_dim:
            raise ValueError(f"context must be text states [B, L, text_dim]=[{b}, L, {self.config.text_dim}], "
                             f"got {tuple(context.shape)}")
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        if kv_cache is not None and not causal:
            raise ValueError("a KV cache needs causal=True (bidirectional attention sees future frames)")
        if kv_only and (kv_cache is None or output_hidden_layers or tracking):
            raise ValueError("kv_only (a cache pass) needs a kv_cache, no gradients and no output_hidden_layers")
        if pending_x is not None and (kv_cache is None or kv_only or output_hidden_layers or tracking):
            raise ValueError("pending_x (a fused cache pass) needs a kv_cache, no gradients, no kv_only and no "
                             "output_hidden_layers")
        if clean_x is not None and (kv_cache is not None or not causal):
            raise ValueError("teacher forcing (clean_x) is a full causal forward: no kv_cache, causal=True")

    def _plan_cached(self, plan: ForwardPlan, start_frame: int, pending_x, pending_timestep) -> None:
        """x is the chunk [start_frame, start_frame + F) against the cache, after a fused finished chunk if any:
        without gradients each layer writes and attends over the cache; with them, over a snapshot of it."""
        x, cache, tpf = plan.latents[0], plan.kv_cache, plan.tokens_per_frame
        b, nf = x.shape[:2]
        pending = None
        if pending_x is not None:
            self._check_latents(pending_x, "pending_x")
            n = plan.n_pending = pending_x.shape[1]
            if pending_x.shape[0] != b or pending_x.shape[3:] != x.shape[3:] or n > start_frame:
                raise ValueError(f"pending_x {tuple(pending_x.shape)} must be a finished chunk of the same batch and "
                                 f"latent size as x {tuple(x.shape)} ending at start_frame={start_frame}")
            pt = torch.zeros(b, n, device=plan.t.device, dtype=plan.t.dtype) if pending_timestep is None else \
                self._frame_timesteps(pending_timestep, b, n, "pending_timestep")
            pending = cache.plan(start_frame - n, n, tpf, b)
            cache.commit(pending)  # the chunk below continues the stream after the finished one
            plan.latents.insert(0, pending_x)
            plan.t = torch.cat([pt.to(plan.t.dtype), plan.t], dim=1)
        plan.chunk = cache.plan(start_frame, nf, tpf, b)
        if plan.tracking:
            plan.attn = [ContextAttention(k, v) for k, v in cache.snapshot_context(plan.chunk)]
        else:
            last = self.config.num_layers - 1
            plan.attn = [CachedAttention(cache, plan.chunk, i, pending, pending_queries=i < last)
                         for i in range(self.config.num_layers)]

    def _plan_teacher_forcing(self, plan: ForwardPlan, clean_x: torch.Tensor, clean_timestep) -> None:
        """[clean_x | x] in one sequence; both halves get identical positions (the RoPE table repeats the frames)."""
        x, cfg = plan.latents[0], self.config
        b, nf = x.shape[:2]
        self._check_latents(clean_x, "clean_x")
        if clean_x.shape != x.shape:
            raise ValueError(f"clean_x shape {tuple(clean_x.shape)} != x shape {tuple(x.shape)}")
        ct = torch.zeros_like(plan.t) if clean_timestep is None else self._frame_timesteps(
            clean_timestep, b, nf, "clean_timestep")
        plan.latents.insert(0, clean_x)
        plan.t = torch.cat([ct, plan.t], dim=1)
        plan.teacher_forcing = True
        fmask = teacher_forcing_frame_mask(self.block_sizes(nf), cfg.local_attn_size, cfg.sink_size, x.device)
        plan.attn = [FullAttention(expand_frame_mask(fmask, plan.tokens_per_frame))] * cfg.num_layers

    def _full_attention(self, nf: int, tpf: int, causal: bool, device) -> list[SelfAttention]:
        """Every layer attends within the sequence: bidirectionally, or block-causally (a mask, unless it is full)."""
        cfg = self.config
        if not causal:
            return [FullAttention()] * cfg.num_layers
        fmask = block_causal_frame_mask(self.block_sizes(nf), cfg.local_attn_size, cfg.sink_size, device)
        if bool(fmask.all()):
            return [FullAttention()] * cfg.num_layers
        return [FullAttention(expand_frame_mask(fmask, tpf), fmask, tpf)] * cfg.num_layers

    def _absolute_positions(self, start: int, frames: int, grid: tuple[int, int], repeats: int = 1):
        """E_t[min(f, K - 1)] + E_s[i, j] for the frames [start, start + frames) of an h x w token ``grid`` (a grid
        smaller than the table's takes its top-left corner; the range is repeated ``repeats`` times, as teacher
        forcing's two halves share positions): [repeats * frames * h * w, D], or None without absolute embeddings."""
        if self.frame_embedding is None and self.spatial_embedding is None:
            return None
        (h, w), dim = grid, self.dim
        pos = torch.zeros(frames, h * w, dim, device=self.proj_out.weight.device)
        if self.frame_embedding is not None:
            index = torch.arange(start, start + frames, device=pos.device).clamp(max=self.frame_embedding.shape[0] - 1)
            pos = pos + self.frame_embedding[index][:, None, :]
        if self.spatial_embedding is not None:
            gh, gw = self.config.spatial_embedding_grid
            pos = pos + self.spatial_embedding.view(gh, gw, dim)[:h, :w].reshape(1, h * w, dim)
        return pos.reshape(frames * h * w, dim).repeat(repeats, 1)

    def _caption_layout(self, context: torch.Tensor, start: int, frames: int, grid: tuple[int, int],
                        t: torch.Tensor) -> torch.Tensor | None:
        """The caption-chosen layout of frames [start, start + frames) on an h x w token ``grid`` (the maps' top-left
        corner; frames from K on get zeros), each frame's scaled by its noise level sigma = t / 1000 (a prior on where
        things are is worth the most when the input shows nothing, and is no bias at all on clean frames):
        sigma_f sum_r w_r M_r[f, i, j] u_r with w = Linear(mean_l context[b, l]). ``t`` [B, repeats * frames] is
        the timestep of every frame of the sequence (the range repeated, as teacher forcing's two halves share
        positions). Returns [B, repeats * frames * h * w, D], or None without a caption layout."""
        if self.caption_layout is None:
            return None
        (h, w), maps = grid, self.caption_layout_maps
        weights = self.caption_layout(context.mean(1).to(maps.dtype))  # [B, R]
        own = maps[:, start:start + frames, :h, :w]  # [R, f', h, w]: the frames that have a map
        if own.shape[1] < frames:
            own = torch.cat([own, own.new_zeros(own.shape[0], frames - own.shape[1], h, w)], 1)
        layout = torch.einsum("br,rfn,rd->bfnd", weights, own.flatten(2), self.caption_layout_vectors)
        sigma = (t / 1000.0).to(layout.dtype).reshape(t.shape[0], -1, frames, 1, 1)  # [B, repeats, f, 1, 1]
        return (layout[:, None] * sigma).reshape(t.shape[0], -1, layout.shape[-1])

    def _condition(self, plan: ForwardPlan, context: torch.Tensor) -> None:
        """Per-frame modulation of every frame in the plan, and the text: embedded now, or (a cached forward without
        gradients) read from the cross-attention cache, whose empty slots each block fills in its own forward (so
        sharded parameters are gathered there)."""
        b, n_all = plan.t.shape
        temb, proj = self.condition_embedder.embed_time(plan.t.reshape(-1))
        plan.temb, plan.e = temb.view(b, n_all, -1), proj.view(b, n_all, 6, -1)
        cache, layers = plan.kv_cache, self.config.num_layers
        if cache is not None and not plan.tracking:
            if not cache.cross_matches(context):
                cache.begin_cross(context)
                plan.ctx = self.encode_context(context)
            plan.cross = [cache.cross_slot(i) for i in range(layers)]
        else:
            plan.ctx = self.encode_context(context)
            plan.cross = [None] * layers

    # ------------------------------------------------------------------ helpers
    def _check_latents(self, x: torch.Tensor, name: str = "x") -> None:
        c = self.config
        if x.ndim != 5:
            raise ValueError(f"{name} must be latents [B, F, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] != c.in_channels:
            raise ValueError(f"{name} has {x.shape[2]} latent channels, the model expects in_channels={c.in_channels}")
        _, ph, pw = c.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[3:])} is not divisible by the patch size {(ph, pw)}")
        for what, grid in (("spatial embeddings", c.spatial_embedding_grid),
                           ("caption layout maps", None if not c.caption_layout_rank else c.caption_layout_size[1:])):
            if grid is not None and (x.shape[3] // ph > grid[0] or x.shape[4] // pw > grid[1]):
                raise ValueError(f"{name} has a {x.shape[3] // ph}x{x.shape[4] // pw} token grid (latent size "
                                 f"{tuple(x.shape[3:])}), the model's {what} cover at most {grid[0]}x{grid[1]}")

    @staticmethod
    def _frame_timesteps(timestep: torch.Tensor, b: int, f: int, name: str = "timestep") -> torch.Tensor:
        t = torch.as_tensor(timestep)
        if t.ndim == 1 and t.shape[0] == b:
            return t[:, None].expand(b, f)
        if t.ndim == 2 and tuple(t.shape) == (b, f):
            return t
        raise ValueError(f"{name} must be [B]=[{b}] or [B, F]=[{b}, {f}], got shape {tuple(t.shape)}")

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> tokens [B, F*h*w, D] (the Conv3d patch embedding as one matmul)."""
        b, f, c, hh, ww = x.shape
        _, ph, pw = self.config.patch_size
        w = self.patch_embedding.weight
        x = x.reshape(b, f, c, hh // ph, ph, ww // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        x = x.reshape(b, f * (hh // ph) * (ww // pw), c * ph * pw)
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_embedding.bias)

    def _unpatchify(self, tokens: torch.Tensor, f: int, hh: int, ww: int) -> torch.Tensor:
        """Head output [B, F*h*w, p_h*p_w*C] -> [B, F, C, H, W]."""
        _, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        h, w = hh // ph, ww // pw
        x = tokens.reshape(b, f, h, w, ph, pw, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, -1, hh, ww)

    def _tracks_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def encode_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text states [B, L, text_dim] -> the model's text embedding [B, L, D]."""
        return self.condition_embedder.text_embedder(context.to(self.proj_out.weight.dtype))

    def cross_attention_kv(self, context: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer cross-attention K/V of a prompt (what the cross-attention cache stores)."""
        ctx = self.encode_context(context)
        kvs = [blk.attn2.project_kv(ctx) for blk in self.blocks]
        return [k for k, _ in kvs], [v for _, v in kvs]
