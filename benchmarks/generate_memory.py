"""Resident memory of `selfforcing generate` over a long video, and a stream of 10^6 frames stopped midway.

    .venv/bin/python benchmarks/generate_memory.py [--num-frames 3000] [--stop-after 20] [--out FILE]

1. ``selfforcing generate --num-frames N`` of the shipped model, run through the CLI in this process with the RSS
   read after every chunk the mp4 writer takes. The rolling KV cache is full once the first window (the model's
   training length) has been generated; after that nothing should grow: the growth of RSS from that point to its
   maximum over the rest of the video is the number to watch (issue 26 asks under 10 MB for 3000 frames). Also
   recorded: the growth once the mp4 encoder's lookahead has filled too (48 frames later), and over the second
   half of the video.
2. ``selfforcing generate --num-frames 1000000`` as a child process: once its mp4 is open (generation has begun)
   its RSS is sampled every 0.2 s for ``--stop-after`` seconds, then it gets SIGINT (Ctrl-C). Recorded: peak RSS,
   its growth over the second half of the run, how long it took to stop, its exit status (130) and whether any file
   (the mp4 or its temp file) is left.

Writes benchmarks/results/generate_memory.json (the RSS per chunk of part 1 included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil

MB = 2**20
ENCODER_LOOKAHEAD_FRAMES = 48  # libx264's default rc-lookahead (40) + B-frames, rounded up


def measure_generate(num_frames: int, out_dir: str) -> dict:
    """Part 1: ``selfforcing generate --num-frames num_frames`` in this process; RSS (bytes) after each chunk."""
    from selfforcing.cli import main
    from selfforcing.io import Mp4Writer

    proc = psutil.Process(os.getpid())
    frames, rss = [], []
    real_write = Mp4Writer.write

    def write(self, video):
        real_write(self, video)
        frames.append(self.frames)
        rss.append(proc.memory_info().rss)

    out = os.path.join(out_dir, "long.mp4")
    Mp4Writer.write = write
    try:
        with contextlib.redirect_stdout(io.StringIO()) as report:
            status = main(["generate", "--num-frames", str(num_frames), "--out", out, "--json"])
    finally:
        Mp4Writer.write = real_write
    if status != 0:
        raise RuntimeError(f"generate exited with {status}")
    result = json.loads(report.getvalue().strip().splitlines()[-1])
    window_pixels = _window_pixel_frames(result["window_frames"])
    first = next(i for i, f in enumerate(frames) if f >= window_pixels)
    steady, half = rss[first:], len(rss) // 2
    # libx264 holds up to its rc-lookahead (40) + B-frames of frames before it emits any: its buffers fill over the
    # first ~48 frames after it opens, a bounded warm-up of a few MB that does not grow with the video
    warm = next((i for i, f in enumerate(frames) if f >= window_pixels + ENCODER_LOOKAHEAD_FRAMES), len(rss) - 1)
    return {"num_frames": num_frames, "chunks": len(rss), "window_latent_frames": result["window_frames"],
            "window_pixel_frames": window_pixels, "seconds": result["seconds"], "fps": result["fps"],
            "mp4_bytes": os.path.getsize(out),
            "rss_mb_after_first_window": steady[0] / MB, "rss_mb_max_after_first_window": max(steady) / MB,
            "rss_mb_at_end": rss[-1] / MB, "growth_mb_after_first_window": (max(steady) - steady[0]) / MB,
            "growth_mb_after_encoder_lookahead": (max(rss[warm:]) - rss[warm]) / MB,
            "growth_mb_over_second_half": (max(rss[half:]) - rss[half]) / MB,
            "kb_per_frame_after_first_window": (rss[-1] - steady[0]) / 1024 / max(1, frames[-1] - frames[first]),
            "rss_mb_per_chunk": [round(r / MB, 2) for r in rss]}


def _window_pixel_frames(window_latent: int | None) -> int:
    """Pixel frames of a window of latent frames for the shipped model's autoencoder (1 + 4 (n - 1))."""
    from selfforcing.autoencoders import get_autoencoder

    return get_autoencoder("moving-digits").pixel_frames(window_latent) if window_latent else 1


def measure_stop(stop_after: float, out_dir: str, num_frames: int = 1_000_000) -> dict:
    """Part 2: ``selfforcing generate --num-frames num_frames`` as a child process, its RSS sampled every 0.2 s,
    stopped with SIGINT ``stop_after`` seconds after its mp4 (temp file) was opened."""
    out = os.path.join(out_dir, "endless.mp4")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # a job started in the background by a non-interactive shell (`cmd &`, as CI runners may) ignores SIGINT, and an
    # ignored signal stays ignored across exec: the child would never see the Ctrl-C. Give it the default back.
    child = subprocess.Popen([sys.executable, "-m", "selfforcing.cli", "generate", "--num-frames", str(num_frames),
                              "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ps = psutil.Process(child.pid)
    samples = []
    deadline = time.monotonic() + 300
    while not any(n.startswith(".tmp-") for n in os.listdir(out_dir)):  # the mp4 is open: generation has begun
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"generate never began: {child.communicate()[1][-2000:]}")
        time.sleep(0.05)
    t0 = time.monotonic()
    while time.monotonic() - t0 < stop_after and child.poll() is None:
        with contextlib.suppress(psutil.Error):
            samples.append((time.monotonic() - t0, ps.memory_info().rss))
        time.sleep(0.2)
    if child.poll() is not None:
        raise RuntimeError(f"generate ended by itself ({child.returncode}): {child.stderr.read()[-2000:]}")
    t_stop = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hung
        child.kill()
        _, err = child.communicate()
        raise RuntimeError(f"generate did not stop within 120 s of Ctrl-C; its stderr ends: {err[-3000:]}") from None
    stop_seconds = time.monotonic() - t_stop
    rss = [r for _, r in samples]
    half = len(rss) // 2
    return {"num_frames_asked": num_frames, "ran_s": round(t_stop - t0, 2), "samples": len(rss),
            "rss_mb_max": max(rss) / MB, "rss_mb_at_stop": rss[-1] / MB,
            "growth_mb_over_second_half": (max(rss[half:]) - rss[half]) / MB,
            "stop_seconds": round(stop_seconds, 2), "exit_status": child.returncode,
            "stderr": err.strip().splitlines()[-1:] if err.strip() else [],
            "files_left": sorted(os.listdir(out_dir))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-frames", type=int, default=3000, help="part 1: frames of the long video")
    p.add_argument("--stop-after", type=float, default=20.0, help="part 2: seconds before Ctrl-C (0: skip part 2)")
    p.add_argument("--out", default="benchmarks/results/generate_memory.json")
    args = p.parse_args()
    result = {"benchmark": "generate_memory", "threads": os.environ.get("OMP_NUM_THREADS", "all")}
    with tempfile.TemporaryDirectory(prefix="generate-memory-") as tmp:
        result["long_video"] = measure_generate(args.num_frames, tmp)
    if args.stop_after > 0:
        with tempfile.TemporaryDirectory(prefix="generate-stop-") as tmp:
            result["stopped_stream"] = measure_stop(args.stop_after, tmp)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    summary = {k: v for k, v in result["long_video"].items() if k != "rss_mb_per_chunk"}
    print(json.dumps({**result, "long_video": summary}))


if __name__ == "__main__":
    main()
