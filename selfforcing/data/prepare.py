"""Preparing training stores (:mod:`.store`): clips encoded into latents and text states (``selfforcing data
encode``: :func:`encode_clips` over :func:`moving_digits_clips` or :func:`video_folder_clips`), and teacher ODE
trajectories at the few-step timesteps (``selfforcing data ode-pairs``: :func:`write_ode_pairs`).

Both jobs fill a store with :func:`fill_store`: resumable (a killed job continues where it stopped), a batch at a
time, with the unconditional text states in ``null_context.pt`` beside the records. Each returns the job's summary
(:func:`store_summary`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .. import flow
from ..autoencoders import get_autoencoder
from ..fileio import atomic_write
from ..sampling import sample_bidirectional
from ..text import build_text_encoder
from .moving_digits import render_clip
from .store import StoreWriter
from .video_folder import VideoDecodeError, VideoFolderDataset, skip_kind


class Skipped:
    """What ``make_records`` returns for an item it could not read: ``kind`` is the summary key (e.g.
    decode_failed); the warning naming the file has been given already."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


def fill_store(out: str, attrs: dict, keys: list[str], make_records, batch_size: int, null_context,
               desc: str) -> tuple[int, dict[str, int]]:
    """Write ``make_records(batch_keys) -> [(tensors, metadata) or Skipped]`` for every key not yet in the store at
    ``out`` (resumable: a killed job continues where it stopped), plus the unconditional text states in
    ``out/null_context.pt``. Returns (records written now, {skip kind: count} of the items left out now)."""
    written, skipped = 0, {}
    with StoreWriter(out, resume=os.path.isdir(out), attrs=attrs) as writer:
        todo = [k for k in keys if k not in writer]
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo):
            batch = todo[start:start + batch_size]
            for key, record in zip(batch, make_records(batch)):
                if isinstance(record, Skipped):
                    skipped[record.kind] = skipped.get(record.kind, 0) + 1
                    continue
                tensors, meta = record
                writer.add(tensors, meta, key=key)
                written += 1
    atomic_write(os.path.join(out, "null_context.pt"), lambda tmp: torch.save(null_context.cpu().contiguous(), tmp))
    return written, skipped


def store_summary(out: str, written: int, skipped: dict[str, int], total: int) -> dict:
    """The summary of a store job: records written now, items left out by kind, items already in the store before,
    and the total (written + skipped + existing)."""
    existing = total - written - sum(skipped.values())
    return {"store": out, "written": written, "skipped": dict(sorted(skipped.items())), "existing": existing,
            "total": total}


# ---------------------------------------------------------------------------------------------- encode
@dataclass
class ClipSource:
    """Clips to encode: their store keys, ``load(key)`` -> {"video": [F, 3, H, W] in [-1, 1], "caption"} or
    :class:`Skipped`, what the store records about them (``dataset``, ``num_frames``, ``size`` and the
    dataset's own ``attrs``), and the items left out before any was loaded ({kind: count})."""

    dataset: str
    keys: list[str]
    load: Callable[[str], dict | Skipped]
    num_frames: int
    size: int
    attrs: dict = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def moving_digits_clips(split: str, num_clips: int, *, num_frames: int, size: int = 64,
                        num_digits: tuple[int, int] = (1, 2), seed: int = 0, images_per_digit: int | None = None,
                        start: str = "uniform") -> ClipSource:
    """Moving-Digits clips 0..num_clips-1 of ``split`` (``render_clip``'s settings); the store records
    ``num_digits`` as "LO,HI"."""
    lo, hi = (int(v) for v in num_digits)

    def load(key: str) -> dict:
        return render_clip(split, int(key.rsplit("/", 1)[1]), num_frames=num_frames, size=size, num_digits=(lo, hi),
                           seed=seed, images_per_digit=images_per_digit, start=start)

    return ClipSource("moving-digits", [f"moving-digits/{split}/{i}" for i in range(num_clips)], load, num_frames,
                      size, attrs={"num_digits": f"{lo},{hi}", "images_per_digit": images_per_digit, "start": start})


def video_folder_clips(path: str, *, num_frames: int, size: int, stride: int = 1) -> ClipSource:
    """One clip per video of a folder (:class:`~.video_folder.VideoFolderDataset`); the files the folder's probe
    left out count as skipped, and a file that fails while being read is skipped (never another clip in its
    place)."""
    ds = VideoFolderDataset(path, num_frames, size, stride=stride)

    def load(key: str) -> dict | Skipped:
        i = int(key.rsplit("/", 1)[1])
        try:
            return {"video": ds.load(i), "caption": ds.videos[i].caption}
        except VideoDecodeError as err:
            ds.skip(i, err)
            return Skipped(skip_kind(err))

    return ClipSource("video-folder", [f"video/{i}" for i in range(len(ds))], load, num_frames, size,
                      skipped=dict(Counter(ds.skip_kinds.values())))


def _clip_encoder(load: Callable[[str], dict | Skipped], autoencoder, text_encoder):
    """``make_records`` of an encode job: each loaded clip's latents [F', C, h, w] and caption text states [L, D]
    (and its caption as metadata); skipped items pass through."""

    @torch.no_grad()
    def make_records(batch_keys: list[str]) -> list:
        items = [load(k) for k in batch_keys]
        good = [it for it in items if not isinstance(it, Skipped)]
        if not good:
            return items
        latents = iter(autoencoder.encode(torch.stack([it["video"] for it in good])))
        states = iter(text_encoder.encode([it["caption"] for it in good]).states)
        return [it if isinstance(it, Skipped) else ({"latents": next(latents), "context": next(states)},
                                                    {"caption": it["caption"]}) for it in items]

    return make_records


def encode_clips(out: str, source: ClipSource, *, autoencoder: str = "moving-digits", text_encoder: str = "minilm",
                 text_len: int | None = 32, negative_prompt: str = "", batch_size: int = 8) -> dict:
    """Encode every clip of ``source`` not yet in the store at ``out`` into its latents and caption text states, with
    the named autoencoder and text encoder; ``negative_prompt``'s states are the store's null context. Returns the
    job's :func:`store_summary` (the source's own skipped items included)."""
    ae = get_autoencoder(autoencoder)
    text = build_text_encoder(text_encoder, text_len)
    attrs = {"dataset": source.dataset, "autoencoder": autoencoder, "text_encoder": text.identity,
             "num_frames": source.num_frames, "size": source.size, **source.attrs}
    written, skipped = fill_store(out, attrs, source.keys, _clip_encoder(source.load, ae, text), batch_size,
                                  text.encode([negative_prompt]).states[0], "encode")
    for kind, count in source.skipped.items():
        skipped[kind] = skipped.get(kind, 0) + count
    return store_summary(out, written, skipped, len(source.keys) + sum(source.skipped.values()))


# ---------------------------------------------------------------------------------------------- ode-pairs
def training_captions(num_prompts: int, num_digits: tuple[int, int] = (1, 2), seed: int = 0) -> list[str]:
    """The captions of Moving-Digits training clips 0..num_prompts-1."""
    return [render_clip("train", i, num_frames=1, num_digits=num_digits, seed=seed)["caption"]
            for i in range(num_prompts)]


def write_ode_pairs(out: str, teacher, text_encoder, prompts: Sequence[str], *, latent_shape: Sequence[int],
                    num_steps: int, shift: float, guidance_scale: float, denoising_steps: Sequence[float],
                    negative_prompt: str = "", seed: int = 0, batch_size: int = 8, teacher_name: str = "") -> dict:
    """For each prompt i not yet in the store at ``out``: the teacher's probability-flow ODE from seeded noise
    (``seed * 1_000_003 + i``, shape ``latent_shape`` = (F, C, H, W)) in ``num_steps`` Euler steps with CFG, its
    states recorded at the ``denoising_steps`` warped with ``shift`` (``ode_states`` [K, F, C, H, W]) beside the
    prompt's text states. ``teacher_name`` is what the store records as its teacher. Returns the job's
    :func:`store_summary`."""
    device = next(teacher.parameters()).device
    shape = tuple(int(v) for v in latent_shape)
    few = flow.denoising_step_list([float(v) for v in denoising_steps], shift=shift)
    null = text_encoder.encode([negative_prompt]).states
    keys = [f"ode/{i}" for i in range(len(prompts))]

    @torch.no_grad()
    def make_records(batch_keys: list[str]) -> list:
        idx = [int(k.rsplit("/", 1)[1]) for k in batch_keys]
        ctx = text_encoder.encode([prompts[i] for i in idx]).states
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                             for i in idx]).to(device)
        _, states = sample_bidirectional(teacher, noise, ctx, null_context=null.expand(len(idx), -1, -1),
                                         num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                                         record_timesteps=few)
        return [({"ode_states": s.cpu(), "context": c.cpu()}, {"prompt": prompts[i]})
                for s, c, i in zip(states, ctx, idx)]

    attrs = {"teacher": teacher_name, "steps": num_steps, "shift": shift, "guidance_scale": guidance_scale,
             "few_step_timesteps": few.tolist(), "latent_shape": list(shape), "text_encoder": text_encoder.identity}
    written, skipped = fill_store(out, attrs, keys, make_records, batch_size, null[0].cpu(), "ode pairs")
    return store_summary(out, written, skipped, len(keys))
