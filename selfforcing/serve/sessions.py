"""Sessions of the streaming server: one shared model, one KV cache per client.

:class:`ModelHost` loads a checkpoint once (``load_streaming_generator``) and owns the worker thread that runs every
piece of torch work; each :class:`Session` builds its own :class:`~selfforcing.inference.StreamingGenerator` over
the shared model, autoencoder and text encoder, so a client's memory is its rolling KV cache (``window_frames``
latent frames) plus the clean frames kept for a re-cache, whatever the length of its stream.

Torch work runs in one worker thread (a single-thread executor), one chunk at a time: sessions take turns chunk
by chunk, the shared modules are never run from two threads at once, and the event loop stays free to answer
other clients, ``/health`` and control messages while a chunk is being made.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .protocol import PromptMessage, StartMessage, message


class Busy(RuntimeError):
    """Every session slot is taken."""


class ModelHost:
    """The loaded model shared by all sessions, the torch worker thread and the session slots.

    Args:
        checkpoint: a shipped model name, a ``save_pretrained`` folder or a checkpoint file (None: the default
            shipped model), see :func:`selfforcing.pipeline.load_streaming_generator`.
        window_frames / sink_frames: each session's rolling KV cache (latent frames). Default: the model's
            ``local_attn_size`` / ``sink_size`` when it has a window, else 4 chunks with 1 chunk of sinks.
        max_sessions: concurrent sessions (WebSocket clients and ``POST /generate`` calls).
        torch_threads: intra-op threads of the worker (default: all cores).
    """

    def __init__(self, checkpoint=None, *, preset: str = "tiny", device: str = "cpu", window_frames: int | None = None,
                 sink_frames: int | None = None, max_sessions: int = 4, torch_threads: int | None = None,
                 use_ema: bool = False) -> None:
        from ..pipeline import load_streaming_generator, resolve_checkpoint

        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.checkpoint = resolve_checkpoint(checkpoint)
        gen, self.spec = load_streaming_generator(self.checkpoint, preset=preset, use_ema=use_ema, device=device,
                                                  window_frames=window_frames, sink_frames=sink_frames,
                                                  max_frames=64)
        self.model, self.autoencoder, self.text_encoder = gen.model, gen.autoencoder, gen.text_encoder
        self.steps = list(gen.steps)
        cfg = self.model.config
        k = cfg.num_frame_per_block
        if window_frames is None:
            window_frames = cfg.local_attn_size if cfg.local_attn_size > 0 else 4 * k
            if sink_frames is None:
                sink_frames = cfg.sink_size if cfg.local_attn_size > 0 else k
        if window_frames < 1:
            raise ValueError("the server streams without end: window_frames must be >= 1 (a rolling cache)")
        self.window_frames, self.sink_frames = window_frames, (0 if sink_frames is None else sink_frames)
        del gen
        self.new_generator()  # check the window settings now, not at the first client
        self.max_sessions = max_sessions
        self.torch_threads = torch_threads or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfforcing-serve",
                                            initializer=self._init_worker)
        self._lock = threading.Lock()
        self.sessions: dict[str, object] = {}
        self.started = time.time()
        self.frames_served = 0

    def _init_worker(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)

    def new_generator(self):
        """A fresh StreamingGenerator over the shared modules (its own KV cache)."""
        from ..inference import StreamingGenerator

        return StreamingGenerator(self.model, self.autoencoder, self.text_encoder, self.spec.latent_size,
                                  steps=self.steps, window_frames=self.window_frames, sink_frames=self.sink_frames,
                                  negative_prompt=self.spec.negative_prompt)

    # ---------------------------------------------------------------- slots
    def acquire(self, kind: str) -> str:
        """Take a session slot (raises :class:`Busy`); returns the session id."""
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise Busy(f"all {self.max_sessions} sessions are in use; try again later")
            sid = uuid.uuid4().hex[:12]
            self.sessions[sid] = kind
            return sid

    def release(self, sid: str) -> None:
        with self._lock:
            self.sessions.pop(sid, None)

    @property
    def active(self) -> int:
        return len(self.sessions)

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the torch worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "checkpoint": self.checkpoint,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()
                       if not k.startswith("_")},
            "spec": self.spec.to_json(),
            "window_frames": self.window_frames,
            "sink_frames": self.sink_frames,
            "frame_size": self.frame_size(),
            "num_frame_per_block": cfg.num_frame_per_block,
        }

    def prompt_of(self, msg) -> str:
        """The text a start / prompt / generate message conditions on: its prompt, or with ``unconditional`` the
        null prompt the model was trained with (its pipeline.json negative_prompt, usually empty)."""
        return self.spec.negative_prompt if msg.unconditional else msg.prompt

    def frame_size(self) -> tuple[int, int]:
        h, w = self.spec.latent_size
        s = self.autoencoder.spatial_compression
        return h * s, w * s


def encode_frames(frames, fmt: str) -> list[bytes]:
    """float [F, 3, H, W] in [-1, 1] -> one JPEG / PNG file per frame."""
    from PIL import Image

    from ..io import to_uint8_frames

    out = []
    for frame in to_uint8_frames(frames):
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
        else:
            Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class _Switch:
    prompt: str
    recache: bool


class Session:
    """One WebSocket client: its generator, its stream task and its controls.

    ``send_text`` / ``send_bytes`` are the connection's coroutines; every message of a chunk (the ``chunk`` header
    and its frames) is sent under one lock, so control replies never land between a header and its frames."""

    LEAD_S = 1.5  # with an fps, the server runs at most this far ahead of real-time playback
    SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long loses its stream

    def __init__(self, host: ModelHost, sid: str, send_text, send_bytes) -> None:
        self.host, self.sid = host, sid
        self._raw_text, self._raw_bytes = send_text, send_bytes
        self.send_lock = asyncio.Lock()
        self.gen = None
        self.task: asyncio.Task | None = None
        self._stop = False
        self._quiet = False
        self._resumed = asyncio.Event()
        self._wake = asyncio.Event()
        self._switch: _Switch | None = None
        self.start_msg: StartMessage | None = None
        self.frames_sent = 0
        self.chunks_sent = 0

    async def _send_text(self, text: str) -> None:
        await asyncio.wait_for(self._raw_text(text), self.SEND_TIMEOUT_S)

    async def _send_bytes(self, data: bytes) -> None:
        await asyncio.wait_for(self._raw_bytes(data), self.SEND_TIMEOUT_S)

    async def send(self, type_: str, **fields) -> None:
        async with self.send_lock:
            await self._send_text(message(type_, **fields))

    @property
    def streaming(self) -> bool:
        return self.task is not None and not self.task.done()

    # ------------------------------------------------------------ controls
    async def start(self, msg: StartMessage) -> None:
        """Begin a stream (a running one is stopped first)."""
        await self.stop(quiet=True)
        self.start_msg, self._stop, self._quiet, self._switch = msg, False, False, None
        self.frames_sent = self.chunks_sent = 0
        self._resumed.set()
        if self.gen is None:
            self.gen = await self.host.run(self.host.new_generator)
        await self.host.run(self.gen.start, self.host.prompt_of(msg), msg.seed)
        w, h = self.host.frame_size()[::-1]
        fps = float(msg.fps) if msg.fps is not None else None
        await self.send("started", prompt=msg.prompt, unconditional=msg.unconditional, seed=msg.seed,
                        num_frames=msg.num_frames, fps=fps, format=msg.format, recache=msg.recache, width=w, height=h)
        self.task = asyncio.create_task(self._loop(msg))

    def switch(self, msg: PromptMessage) -> bool:
        recache = self.start_msg.recache if msg.recache is None else msg.recache
        if self._switch is not None:  # two switches before the next chunk: the last prompt, re-cache if any asked
            recache = recache or self._switch.recache
        self._switch = _Switch(self.host.prompt_of(msg), recache)
        return recache

    def pause(self) -> None:
        self._resumed.clear()
        self._wake.set()

    def resume(self) -> None:
        self._resumed.set()
        self._wake.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    async def stop(self, quiet: bool = False) -> None:
        """End the stream after the chunk in progress (a chunk already on the worker is finished, not torn)."""
        self._stop, self._quiet = True, quiet
        self._resumed.set()
        self._wake.set()
        if self.task is not None:
            try:
                await self.task
            except Exception:  # the connection broke while sending: the caller is cleaning up anyway
                pass
            self.task = None

    async def close(self) -> None:
        await self.stop(quiet=True)
        self.gen = None

    # ------------------------------------------------------------ the stream
    def _step(self, switch: _Switch | None, fmt: str, keep: int | None):
        """Worker thread: apply a pending prompt switch, make the next chunk, encode its frames."""
        if switch is not None:
            self.gen.switch_prompt(switch.prompt, recache=switch.recache)
        chunk = self.gen.next_chunk()
        frames = chunk.frames if keep is None else chunk.frames[:keep]
        return chunk, encode_frames(frames, fmt)

    async def _loop(self, msg: StartMessage) -> None:
        try:
            await self._stream(msg)
        except Exception as err:  # a broken connection ends quietly; a failed chunk is told to the client
            if not self._stop:
                try:
                    await self.send("error", error="generation_failed", detail=f"{type(err).__name__}: {err}"[:300])
                except Exception:
                    pass
            raise

    async def _stream(self, msg: StartMessage) -> None:
        fps = float(msg.fps) if msg.fps is not None else None
        clock = time.monotonic()  # playback time 0 (moved on resume)
        while not self._stop:
            if self.paused:
                paused_at = time.monotonic()
                await self._resumed.wait()
                clock += time.monotonic() - paused_at
                continue
            keep = None if msg.num_frames is None else msg.num_frames - self.frames_sent
            switch, self._switch = self._switch, None
            t0 = time.perf_counter()
            chunk, blobs = await self.host.run(self._step, switch, msg.format, keep)
            latency = time.perf_counter() - t0
            async with self.send_lock:
                await self._send_text(message(
                    "chunk", index=chunk.index, start_frame=self.frames_sent, frames=len(blobs),
                    latency_s=round(latency, 4), compute_s=round(chunk.seconds, 4), prompt=chunk.prompt,
                    format=msg.format))
                for blob in blobs:
                    await self._send_bytes(blob)
            self.frames_sent += len(blobs)
            self.chunks_sent += 1
            self.host.frames_served += len(blobs)
            if msg.num_frames is not None and self.frames_sent >= msg.num_frames:
                await self.send("done", reason="complete", frames=self.frames_sent, chunks=self.chunks_sent)
                return
            if fps:  # do not run more than LEAD_S ahead of the client's playback
                ahead = self.frames_sent / fps - (time.monotonic() - clock)
                if ahead > self.LEAD_S and not self._stop:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), ahead - self.LEAD_S)
                    except asyncio.TimeoutError:
                        pass
        if not self._quiet:
            await self.send("done", reason="stopped", frames=self.frames_sent, chunks=self.chunks_sent)
