"""What a streamed chunk costs, against video length and against the hardware (the library of `selfforcing bench`).

``bench stream`` extends a video chunk by chunk (K = ``num_frame_per_block`` frames, a few denoising steps each)
with a context window of the training length L, in one of these ways:

* ``rolling_kv`` (Self Forcing, Algorithm 2): a rolling KV cache of L frames; each chunk runs the denoising
  steps against the cache and one cache pass of the clean chunk. Cost per chunk is constant.
* ``recompute`` (a causal model without a KV cache, CausVid-style recomputation): every denoising forward runs
  the block-causal model over [the last L - K clean frames at t = 0 | the noisy chunk], so the context is
  re-encoded at every step (:func:`~selfforcing.sampling.denoise_chunk_in_context`). While the window is still
  filling this computes exactly what ``rolling_kv``
  computes (the tests check it); afterwards the context frames are re-encoded seeing only the window.
* ``recompute_kv`` (opt-in, ``--strategies``): re-encode the window once per chunk into a fresh KV cache (the
  "re-compute KV when shifting the window" of the paper's Fig. 3b), then run the denoising steps against it.
* ``sliding_window`` (a bidirectional model, no cache): every denoising step runs the model over the whole
  window (context frames at t = 0 and the noisy chunk).

``bench chunk`` times one AR chunk step of ``rolling_kv`` with a full window, counts its useful matmul and
attention FLOPs analytically (``selfforcing.perf``) and reports them as a share of the matmul peak measured in
the same run.

Random weights: speed does not depend on them. ``--device cuda --dtype bfloat16`` runs the same measurements on a
GPU (bf16 weights and cache, SDPA flash kernels; ``--attention flex`` for masked forwards, ``--compile`` for
torch.compile'd transformer blocks); timings there synchronize the device around every chunk.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from . import flow
from .accel.cpu import chosen_paths, timed_kernel_choice
from .accel.cpu import native as native_blocks
from .accel.cpu.ffn import ffn_setting
from .models import CausalWanModel
from .models.wan import attention as attn
from .models.wan.presets import preset_sizes
from .models.wan.runtime import plain_pytorch
from .perf import chunk_step_flops, matmul_peak_gflops, rolling_chunk_flops
from .sampling import cache_chunk, denoise_chunk, denoise_chunk_in_context, generate_chunk

DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------- strategies
def new_stream_state(model, batch_size: int, latent_size: tuple[int, int], window: int) -> dict:
    """What a strategy keeps between chunks: the rolling cache and the clean frames of the window."""
    h, w = latent_size
    return {"window": window, "history": [],
            "cache": model.new_kv_cache(batch_size, h, w, window_frames=window, sink_frames=0)}


def _remember(state: dict, x0) -> None:
    """Keep the last ``window - K`` clean frames (the context of the next chunk), chunk by chunk."""
    history = state["history"]
    history.append(x0)
    while sum(c.shape[1] for c in history) > state["window"] - x0.shape[1]:
        history.pop(0)


def _chunk_rolling(model, state, x, steps, ctx, start, generator=None):
    """What ``StreamingGenerator`` does: the previous chunk's cache pass runs fused with this chunk's first step."""
    x0, state["pending"] = generate_chunk(model, x, steps, ctx, kv_cache=state["cache"], start_frame=start,
                                          pending=state.get("pending") if start > 0 else None, generator=generator)
    return x0


def _in_context(model, state, x, steps, ctx, start, generator, causal: bool):
    history = torch.cat(state["history"], 1) if state["history"] else None
    x0 = denoise_chunk_in_context(model, x, steps, ctx, history, start_frame=start, causal=causal, generator=generator)
    _remember(state, x0)
    return x0


def _chunk_recompute(model, state, x, steps, ctx, start, generator=None):
    return _in_context(model, state, x, steps, ctx, start, generator, causal=True)


def _chunk_sliding(model, state, x, steps, ctx, start, generator=None):
    return _in_context(model, state, x, steps, ctx, start, generator, causal=False)


def _chunk_recompute_kv(model, state, x, steps, ctx, start, generator=None):
    k = x.shape[1]
    context = state["history"]
    first = start - sum(c.shape[1] for c in context)
    cache = model.new_kv_cache(x.shape[0], x.shape[-2], x.shape[-1], window_frames=state["window"], sink_frames=0)
    if first > 0:
        cache.skip_to(first)
    s = first
    for chunk in context:  # rebuild the window's KV from its clean frames, chunk by chunk (block-causal)
        cache_chunk(model, chunk, ctx, kv_cache=cache, start_frame=s)
        s += chunk.shape[1]
    x0 = denoise_chunk(model, x, steps, ctx, kv_cache=cache, start_frame=start, generator=generator)
    _remember(state, x0)
    assert s == start and x0.shape[1] == k
    return x0


STRATEGIES = {"rolling_kv": _chunk_rolling, "recompute": _chunk_recompute, "recompute_kv": _chunk_recompute_kv,
              "sliding_window": _chunk_sliding}


# ---------------------------------------------------------------------------------------------- set-up
def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load() -> list[float]:
    """1/5/15-minute load averages: other processes on a shared machine inflate CPU timings."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _sync(device: str) -> None:
    if device == "cuda":
            torch.cuda.synchronize()


def build_model(preset: str, device: str = "cpu", dtype: str = "float32", compile: bool = False,
                attention: str = "sdpa"):
    """A randomly initialised eval-mode model on ``device`` in ``dtype`` (bf16: weights, activations and cache)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available")
    torch.manual_seed(0)
    model = CausalWanModel.from_preset(preset)
    # the whole model in one dtype (bf16 on CUDA: weights, activations and KV cache); nn.Module.to, not diffusers'
    # override, which warns about its float32 modules: the forward computes norms and modulation in float32 anyway
    model = torch.nn.Module.to(model, device=device, dtype=_dtype(dtype)).eval().requires_grad_(False)
    attn.set_cuda_masked_attention(attention)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if compile:
        # one graph serves every block (parameters are inputs); shapes that change while the cache fills
        # become dynamic after the first recompilation
        import torch._dynamo as dynamo  # only for --compile (a slow import)

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        for blk in model.blocks:
            blk.compile()
    return model


def _sizes(preset: str, latent_size, text_len, train_frames=None) -> tuple[tuple[int, int], int, int, float]:
    """(latent size, text tokens, training length in latent frames, shift): the arguments, else the preset's
    (:func:`~selfforcing.models.wan.presets.preset_sizes`)."""
    sizes = preset_sizes(preset)
    return (tuple(latent_size or sizes["latent_size"]), text_len or sizes["text_len"],
            train_frames or sizes["train_frames"], sizes["shift"])


def _context(model, text_len: int, device: str, dtype: str):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, text_len, model.config.text_dim, generator=g).to(device=device, dtype=_dtype(dtype))


def denoising_steps(num_steps: int, shift: float) -> list[float]:
    """``num_steps`` evenly spaced timesteps from 1000, warped with ``shift`` (the few-step list)."""
    return flow.denoising_step_list([1000 - 1000 * i / num_steps for i in range(num_steps)], shift=shift).tolist()


# ---------------------------------------------------------------------------------------------- benchmarks
MIN_TRAIN_LENGTHS_PER_ROUND = 4


def streams_per_round(length: int) -> int:
    """Streams of a video ``length`` training lengths long in one round of :func:`stream_benchmark`:
    ceil(MIN_TRAIN_LENGTHS_PER_ROUND / length), at least 1 (1x: 4, 2x: 2, 5x and longer: 1)."""
    return max(1, -(-MIN_TRAIN_LENGTHS_PER_ROUND // length))


def stream_benchmark(preset: str, lengths: list[int], strategies: list[str], train_frames: int | None = None,
                     latent_size: tuple[int, int] | None = None, num_steps: int = 4, device: str = "cpu",
                     dtype: str = "float32", compile: bool = False, attention: str = "sdpa",
                     text_len: int | None = None, repeats: int = 5) -> dict:
    """Rows {strategy, length, chunk_latency_s, first_chunk_latency_s, fps} for every strategy and length.

    Each strategy runs ``repeats`` rounds; a round streams every length in turn (x1, x10, x1, x10, ...), so that a
    slow spell of a shared machine falls on every length alike, and a video shorter than
    ``MIN_TRAIN_LENGTHS_PER_ROUND`` training lengths streams that many times over in its round (a 1x video of the
    laptop presets is 4 chunks, a 10x one 40): without that, the 1x median would pool 4 x repeats chunks whose middle
    falls between two chunks of different cost, against hundreds at 10x. chunk_latency_s is the median over every
    chunk of every stream (also p10 / p90), first_chunk_latency_s the median over streams of the first chunk, fps the
    latent frames of a video over its median total time.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    load_before = _load()
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    (h, w), text_len, train_frames, shift = _sizes(preset, latent_size, text_len, train_frames)
    model = build_model(preset, device, dtype, compile, attention)
    c = model.config
    k = c.num_frame_per_block
    if train_frames % k:
        raise ValueError(f"--train-frames {train_frames} must be a multiple of the chunk size {k}")
    steps = denoising_steps(num_steps, shift)
    ctx = _context(model, text_len, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)

    def noise():
        return torch.randn(1, k, c.in_channels, h, w, generator=g, device=device).to(_dtype(dtype))

    def run_chunk(fn, state, start) -> float:
        """Seconds of one chunk of strategy ``fn``."""
        x = noise()
        _sync(device)
        t0 = time.perf_counter()
        fn(model, state, x, steps, ctx, start, g)
        _sync(device)
        return time.perf_counter() - t0

    tpf = model.tokens_per_frame(h, w)
    rows = []
    with torch.no_grad(), timed_kernel_choice():  # as StreamingGenerator streams
        for name in strategies:
            streams = _time_streams(model, STRATEGIES[name], run_chunk, (h, w), train_frames, k, lengths, repeats)
            for m in lengths:
                rows.append(_stream_row(name, m, streams[m], train_frames, k, repeats))
                if name == "rolling_kv":  # the work per chunk, which grows while the window fills
                    rows[-1]["chunk_gflop_median"] = statistics.median(
                        rolling_chunk_flops(c, tpf, k, train_frames, i, text_len, num_steps)
                        for i in range(m * train_frames // k)) / 1e9
    return {"benchmark": "stream", "preset": preset, "device": device, "dtype": dtype, "compile": compile,
            "train_frames": train_frames, "latent_size": [h, w], "tokens_per_frame": tpf,
            "text_len": text_len, "chunk_frames": k, "denoising_steps": num_steps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
            "ratios": _stream_ratios(rows, lengths, strategies),
            "cpu_blocks": _cpu_blocks_report() if device == "cpu" else None,
            "load_average_before": load_before, "load_average_after": _load(),
            "repeats": repeats, "note": STREAM_NOTE}


STREAM_NOTE = (
    "chunk_latency_s: median over all chunks of every stream of the video (after one warm-up stream; "
    "at 1x most of them attend to a window that is still filling); full_window_chunk_latency_s: "
    "median over the chunks from the first that attends to a full window on; fps: latent frames per "
    "second of chunk compute; chunk_gflop_median (rolling_kv): the analytic matmul work of the median "
    "chunk; rolling_kv_flops_xLONG_over_xSHORT: its growth from the shortest video to the longest "
    "(the chunks of the first window attend to fewer frames); rolling_kv_seconds_per_flop_...: the "
    "growth of the cost per unit of that work")


def _time_streams(model, fn, run_chunk, latent_size, train_frames: int, k: int, lengths: list[int],
                  repeats: int) -> dict[int, list[list[float]]]:
    """Chunk latencies of every stream of strategy ``fn``, by video length (in training lengths): one warm-up
    stream (one-off allocations, kernels, compilation), then ``repeats`` rounds over the lengths."""
    warm = new_stream_state(model, 1, latent_size, train_frames)
    for start in range(0, train_frames + k, k):
        run_chunk(fn, warm, start)
    streams: dict[int, list[list[float]]] = {m: [] for m in lengths}
    for _ in range(repeats):
        for m in lengths:
            for _ in range(streams_per_round(m)):
                state = new_stream_state(model, 1, latent_size, train_frames)
                streams[m].append([run_chunk(fn, state, start) for start in range(0, m * train_frames, k)])
    return streams


def _stream_row(name: str, m: int, streams: list[list[float]], train_frames: int, k: int, repeats: int) -> dict:
    """The latency statistics of strategy ``name`` at video length ``m`` (see :func:`stream_benchmark`)."""
    full_from = train_frames // k - 1  # the first chunk that attends to a full window (its own frames last)
    pooled = sorted(t for lat in streams for t in lat)
    full = [t for lat in streams for t in lat[full_from:]]
    return {"strategy": name, "length": m, "latent_frames": m * train_frames,
            "chunk_latency_s": statistics.median(pooled),
            "full_window_chunk_latency_s": statistics.median(full),
            "chunk_latency_p10_s": pooled[int(0.1 * (len(pooled) - 1))],
            "chunk_latency_p90_s": pooled[int(0.9 * (len(pooled) - 1))],
            "first_chunk_latency_s": statistics.median(lat[0] for lat in streams),
            "fps": m * train_frames / statistics.median(sum(lat) for lat in streams),
            "chunks": len(pooled), "streams": len(streams), "repeats": repeats}


def _stream_ratios(rows: list[dict], lengths: list[int], strategies: list[str]) -> dict:
    """Latency of each strategy against rolling_kv at the longest video, and of the longest video against the
    shortest; rolling_kv's growth of work and of seconds per unit of work. Empty without rolling_kv."""
    by = {(r["strategy"], r["length"]): r["chunk_latency_s"] for r in rows}
    ratios = {}
    if not lengths or "rolling_kv" not in strategies:
        return ratios
    lo, hi = min(lengths), max(lengths)
    for name in strategies:
        if name != "rolling_kv":  # against itself the ratio is 1 by construction
            ratios[f"{name}_x{hi}_over_rolling_kv_x{hi}"] = by[(name, hi)] / by[("rolling_kv", hi)]
        ratios[f"{name}_x{hi}_over_x{lo}"] = by[(name, hi)] / by[(name, lo)]
        full = {r["length"]: r["full_window_chunk_latency_s"] for r in rows if r["strategy"] == name}
        ratios[f"{name}_full_window_x{hi}_over_x{lo}"] = full[hi] / full[lo]
    work = {r["length"]: r["chunk_gflop_median"] for r in rows if r["strategy"] == "rolling_kv"}
    ratios[f"rolling_kv_flops_x{hi}_over_x{lo}"] = work[hi] / work[lo]
    ratios[f"rolling_kv_seconds_per_flop_x{hi}_over_x{lo}"] = (
        by[("rolling_kv", hi)] / work[hi]) / (by[("rolling_kv", lo)] / work[lo])
    return ratios


def chunk_benchmark(preset: str, latent_size: tuple[int, int] | None = None, context_frames: int | None = None,
                    text_len: int | None = None, num_steps: int = 4, repeats: int = 10, device: str = "cpu",
                    dtype: str = "float32", compile: bool = False, attention: str = "sdpa",
                    fuse_cache_pass: bool = True, compare_plain: bool = False) -> dict:
    """Median time of one chunk step with ``context_frames`` cached, its analytic FLOPs, and the share of the
    matmul peak (same device and dtype) measured in the same run.

    A chunk step is S denoising steps plus one cache pass. With ``fuse_cache_pass`` (the default, as
    ``StreamingGenerator`` streams) the previous chunk's cache pass runs inside this chunk's first step, so a timed
    step holds the previous chunk's cache pass instead of its own: the same work per chunk in a steady stream.
    The FLOPs counted are those of the separate passes either way (the fused pass does no less useful work).

    ``compare_plain``: a second stream on the same weights runs in lockstep, its steps timed alternately with these
    (order swapped every step), in plain PyTorch: :func:`selfforcing.models.wan.runtime.plain_pytorch` and the
    cache pass as its own forward. Its median and the ratio of the two medians go into the result: a comparison that
    a slow spell of a shared machine cannot tilt, unlike two numbers taken on different days."""
    load_before = _load()
    (h, w), text_len, train_frames, shift = _sizes(preset, latent_size, text_len)
    model = build_model(preset, device, dtype, compile, attention)
    c = model.config
    k = c.num_frame_per_block
    context_frames = train_frames - k if context_frames is None else context_frames  # a full training window
    steps = denoising_steps(num_steps, shift)
    ctx = _context(model, text_len, device, dtype)
    window = context_frames + k
    ours = _ChunkStream(model, steps, ctx, (h, w), window, fuse_cache_pass, plain=False)
    plain = _ChunkStream(model, steps, ctx, (h, w), window, False, plain=True) if compare_plain else None
    peak_before = matmul_peak_gflops(dtype=_dtype(dtype), device=device)
    times, plain_times, local_peaks = _time_chunk_steps(ours, plain, (h, w), context_frames, repeats, device, dtype)
    peak = max(peak_before, matmul_peak_gflops(dtype=_dtype(dtype), device=device))  # the better of two readings
    tpf = model.tokens_per_frame(h, w)
    flops = chunk_step_flops(c, tpf, k, context_frames, text_len, num_steps)
    median = statistics.median(times)
    achieved = flops / median / 1e9
    paired = statistics.median(flops / t / 1e9 / p for t, p in zip(times, local_peaks))
    baseline = {}
    if compare_plain:
        plain_median = statistics.median(plain_times)
        baseline = {"plain_seconds": plain_median, "plain_fraction_of_peak": flops / plain_median / 1e9 / peak,
                    "speedup_over_plain": plain_median / median,
                    "speedup_over_plain_step_by_step": statistics.median(p / t for p, t in zip(plain_times, times))}
    return {"benchmark": "chunk_step", "preset": preset, "device": device, "dtype": dtype, "compile": compile,
            "fused_cache_pass": fuse_cache_pass,
            "dim": model.dim, "layers": c.num_layers, "tokens_per_frame": tpf, "chunk_frames": k,
            "context_frames": context_frames, "text_len": text_len, "steps": num_steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "seconds": median, "min_seconds": min(times), "repeats": len(times),
            "gflop": flops / 1e9, "achieved_gflops": achieved, "matmul_peak_gflops": peak,
            "fraction_of_peak": achieved / peak, "fraction_of_local_peak": paired,
            "local_peak_gflops_median": statistics.median(local_peaks),
            "cpu_ffn": _cpu_ffn_report() if device == "cpu" else None,
            "cpu_blocks": _cpu_blocks_report() if device == "cpu" else None, **baseline,
            "load_average_before": load_before, "load_average_after": _load(),
            "note": "fraction_of_peak: median step time against the best of 2 x 20 matmuls (before and after the "
                    "steps); fraction_of_local_peak: median over steps of (step throughput / best of 3 matmuls "
                    "timed right after that step)"}


def _time_chunk_steps(ours, plain, latent_size, context_frames: int, repeats: int, device: str, dtype: str):
    """(step seconds, plain step seconds, local matmul peaks) of the ``repeats`` steps with a full window of
    context, after the steps that fill the window and one such step as warm-up. ``plain`` (or None) steps in
    lockstep with ``ours``, the order swapped every step."""
    (h, w), k = latent_size, ours.model.config.num_frame_per_block
    g = torch.Generator(device=device).manual_seed(0)
    times, plain_times, local_peaks = [], [], []
    with torch.no_grad():
        for i in range(repeats + (context_frames + k) // k):  # window // k steps fill and warm up, then `repeats`
            x = torch.randn(1, k, ours.model.config.in_channels, h, w, generator=g, device=device).to(_dtype(dtype))
            timed = ours.start >= context_frames + k  # a full window of context (and one such chunk as warm-up)
            if plain is not None and i % 2:
                dt_plain = plain.step(x, g)
            dt = ours.step(x, g)
            if plain is not None and not i % 2:
                dt_plain = plain.step(x, g)
            if timed:
                times.append(dt)
                if plain is not None:
                    plain_times.append(dt_plain)
                # the peak right after this step (best of 3 products): a slow spell of a shared machine then lowers
                # both sides of this step's ratio alike
                local_peaks.append(matmul_peak_gflops(dtype=_dtype(dtype), device=device, repeats=3, warmup=0))
    return times, plain_times, local_peaks


class _ChunkStream:
    """One stream of chunk steps against its own rolling KV cache (for :func:`chunk_benchmark`)."""

    def __init__(self, model, steps, ctx, latent_size: tuple[int, int], window: int, fuse_cache_pass: bool,
                 plain: bool) -> None:
        self.model, self.steps, self.ctx = model, steps, ctx
        self.fuse, self.plain = fuse_cache_pass, plain
        self.cache = new_stream_state(model, 1, latent_size, window)["cache"]
        self.start, self.pending = 0, None

    def step(self, x, generator) -> float:
        """Generate the chunk for noise ``x`` [1, k, C, H, W]; the seconds it took (device synchronised)."""
        device = str(x.device.type)
        with plain_pytorch() if self.plain else timed_kernel_choice():
            _sync(device)
            t0 = time.perf_counter()
            _, self.pending = generate_chunk(self.model, x, self.steps, self.ctx, kv_cache=self.cache,
                                             start_frame=self.start, pending=self.pending,
                                             fuse_cache_pass=self.fuse, generator=generator)
            _sync(device)
            dt = time.perf_counter() - t0
        self.start += x.shape[1]
        return dt


def _cpu_ffn_report() -> dict:
    """The FFN kernel setting and, under ``auto``, the kernel timed fastest for each FFN shape of the run."""
    chosen = {f"{'C++ blocks, ' if k[0] == 'native_ffn' else ''}{k[1]} tokens x {k[2]}->{k[3]}, {k[4]} threads": v
              for k, v in chosen_paths().items() if k[0] in ("cpu_ffn", "native_ffn")}
    return {"setting": ffn_setting(), "chosen": chosen}


def _cpu_blocks_report() -> dict:
    """Which blocks CPU streaming ran: the setting, and whether the C++ blocks were built (and why not)."""
    err = native_blocks.build_error()
    return {"setting": native_blocks.blocks_setting(),
            "native": native_blocks.blocks_setting() != "python" and native_blocks.extension() is not None,
            "build_error": None if err is None else f"{type(err).__name__}: {err}"[:300]}
