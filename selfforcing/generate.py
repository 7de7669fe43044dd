"""Videos from prompts, written to mp4 as they are made: the library behind ``selfforcing generate``.

Memory stays flat however long the video: the KV cache rolls over a window of the model's training length (from
``pipeline.json``, :func:`streaming_window`) unless a cache over the whole video is asked for (refused up front with
:class:`~selfforcing.inference.CacheTooLarge` when it would not fit), and every chunk is encoded into the mp4 as soon
as it is decoded (:func:`write_video`). A video that fails or is stopped leaves no file behind: the mp4 is written to
a temp file and renamed when complete.
"""

from __future__ import annotations

import os
import time

import torch

from .inference import StreamingGenerator
from .io import Mp4Writer, write_contact_sheet
from .pipeline import PipelineSpec, sample_many_step


def output_paths(out: str, count: int) -> list[str]:
    """The mp4 path of each of ``count`` videos: ``out`` itself for one, NAME_0.mp4, NAME_1.mp4, ... for several."""
    return [out] if count == 1 else [f"{os.path.splitext(out)[0]}_{i}.mp4" for i in range(count)]


def sheet_every(num_frames: int) -> int:
    """The contact sheet shows every k-th frame: at most 32 tiles."""
    return max(1, -(-num_frames // 32))


def streaming_window(spec: PipelineSpec, autoencoder, window_frames: int | None) -> int | None:
    """The KV window in latent frames: ``window_frames`` when given (0: a cache over the whole video, whatever the
    model's config streams with), else the training length of a few-step model whose spec records it (Self Forcing
    streams through a window of its training length, as the server does), else None (the model config's own
    ``local_attn_size``)."""
    if window_frames is not None:
        return window_frames
    if spec.sampler == "few-step" and spec.training_frames:
        return autoencoder.latent_frames(spec.training_frames)
    return None


def streaming_generator(model, autoencoder, text_encoder, spec: PipelineSpec, *, latent_frames: int,
                        window_frames: int | None, sink_frames: int | None = None,
                        prefix_frames: int = 0) -> StreamingGenerator:
    """A :class:`StreamingGenerator` with the spec's few-step timesteps, sized for ``latent_frames`` new latent frames
    after ``prefix_frames`` given ones (chunks may end two blocks past the count). Raises
    :class:`~selfforcing.inference.CacheTooLarge` when a cache over the whole video would not fit."""
    capacity = latent_frames + prefix_frames + 2 * model.config.num_frame_per_block
    return StreamingGenerator(model, autoencoder, text_encoder, spec.latent_size, steps=spec.warped_steps().tolist(),
                              window_frames=window_frames, sink_frames=sink_frames, max_frames=capacity,
                              negative_prompt=spec.negative_prompt)


def _stream_few_step(gen: StreamingGenerator, prompt: str, latent_frames: int, num_frames: int, seed: int, switches,
                     prefix, mp4, keep_every: int | None) -> tuple[int, float, list]:
    """Stream one video into the open ``mp4`` writer, chunk by chunk, keeping only every ``keep_every``-th frame
    (for the contact sheet; None: none). Returns (chunks, first chunk's seconds, kept frames)."""
    written, chunks, first, kept = 0, 0, 0.0, []
    for chunk in gen.stream(prompt, latent_frames, seed=seed, switches=switches, prefix_video=prefix):
        frames = chunk.frames[: num_frames - written]
        if not len(frames):  # the last chunk's extra latent frames decode past num_frames
            continue
        if keep_every:
            kept += [(written + j, frames[j]) for j in range(-written % keep_every, len(frames), keep_every)]
        mp4.write(frames)
        written += len(frames)
        first = first or chunk.seconds
        chunks += 1
    return chunks, first, kept


def write_video(out: str, gen: StreamingGenerator, spec: PipelineSpec, prompt: str, *, num_frames: int, seed: int = 0,
                switches: dict[int, tuple[str, bool]] | None = None, prefix: torch.Tensor | None = None,
                window_frames: int | None = None, sink_frames: int | None = None, sheet: str | None = None) -> dict:
    """Generate one video of ``num_frames`` pixel frames from ``prompt`` with the spec's sampler and write it to the
    mp4 ``out`` at ``spec.fps``; with ``sheet``, also a PNG contact sheet of every k-th frame (:func:`sheet_every`).

    ``few-step``: streamed through ``gen`` chunk by chunk, each chunk encoded as it is decoded (``switches``
    {chunk: (prompt, recache)}, ``prefix`` [1, F, 3, H, W] frames to continue from). ``many-step`` /
    ``bidirectional``: :func:`~selfforcing.pipeline.sample_many_step` with ``gen``'s model, autoencoder and text
    encoder, the cache bounded by ``window_frames`` / ``sink_frames``; the whole clip arrives at once.
    Returns {path, prompt, frames, seconds, fps, first_chunk_latency_s, chunks, sampler}."""
    t0 = time.perf_counter()
    latent_frames = gen.autoencoder.latent_frames(num_frames)
    keep_every = sheet_every(num_frames) if sheet else None
    with Mp4Writer(out, fps=spec.fps) as mp4:
        if spec.sampler == "few-step":
            chunks, first_latency, kept = _stream_few_step(gen, prompt, latent_frames, num_frames, seed, switches,
                                                           prefix, mp4, keep_every)
        else:  # not streamed: the whole clip arrives at once
            frames = sample_many_step(gen.model, gen.autoencoder, gen.text_encoder, spec, prompt, latent_frames,
                                      seed=seed, window_frames=window_frames, sink_frames=sink_frames)[:num_frames]
            mp4.write(frames)
            chunks, first_latency = 1, time.perf_counter() - t0
            kept = [(j, frames[j]) for j in range(0, len(frames), keep_every)] if keep_every else []
        count = mp4.frames
    seconds = time.perf_counter() - t0
    if kept:
        write_contact_sheet(sheet, torch.stack([f for _, f in kept]), labels=[str(j) for j, _ in kept])
    return {"path": out, "prompt": prompt, "frames": count, "seconds": round(seconds, 3),
            "fps": round(count / seconds, 2), "first_chunk_latency_s": round(first_latency, 4), "chunks": chunks,
            "sampler": spec.sampler}
