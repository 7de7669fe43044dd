"""Load test of the streaming server: N WebSocket clients streaming at once for a bounded time.

    .venv/bin/python benchmarks/serve_load.py [--clients 8] [--seconds 30] [--fps 8] [--checkpoint DIR]
                                              [--out benchmarks/results/serve_load.json]

Starts ``selfforcing serve`` in a subprocess on a free loopback port (a tiny random-weight checkpoint unless
``--checkpoint`` is given; ``--max-sessions`` = clients), then runs the clients in this process: each connects,
starts an unbounded stream at ``--fps`` (0: as fast as the server can make it), switches its prompt every
``--switch-every`` seconds, and counts frames, chunks and errors; one more client checks that a session over the
cap gets "busy"; ``/health`` is polled all the time to see that the server stays responsive. Chunk latency is
the server's ``latency_s``: from asking the worker for a chunk to its frames being encoded, queueing behind other
sessions included. Every loop is bounded by ``--seconds``; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPTS = ["the digit 3 moves right", "the digit 8 moves left", "the digit 1 moves up and to the right",
           "the digit 5 moves down while the digit 7 moves left"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))], 4)


async def client(url: str, i: int, args, deadline: float, out: dict) -> None:
    import websockets

    stats = out.setdefault(i, {"frames": 0, "chunks": 0, "errors": [], "latency": [], "switches": 0,
                               "switched_chunks": 0})
    try:
        async with websockets.connect(url, max_size=2**22, open_timeout=30) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if ready["type"] != "ready":
                stats["errors"].append(ready.get("error", ready["type"]))
                return
            prompt = PROMPTS[i % len(PROMPTS)]
            await ws.send(json.dumps({"type": "start", "prompt": prompt, "seed": i, "num_frames": None,
                                      "fps": args.fps or None, "format": "jpeg"}))
            next_switch = time.monotonic() + args.switch_every
            while time.monotonic() < deadline:
                if args.switch_every and time.monotonic() >= next_switch:
                    prompt = PROMPTS[(PROMPTS.index(prompt) + 1) % len(PROMPTS)]
                    await ws.send(json.dumps({"type": "prompt", "prompt": prompt, "recache": True}))
                    stats["switches"] += 1
                    next_switch += args.switch_every
                try:
                    msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if isinstance(msg, bytes):
                    stats["frames"] += 1
                    continue
                msg = json.loads(msg)
                if msg["type"] == "chunk":
                    stats["chunks"] += 1
                    stats["latency"].append(msg["latency_s"])
                    stats["switched_chunks"] += msg["prompt"] == prompt
                elif msg["type"] == "error":
                    stats["errors"].append(msg["error"])
            await ws.send(json.dumps({"type": "stop"}))
    except Exception as err:  # counted, never fatal: the point is to see what breaks
        stats["errors"].append(f"{type(err).__name__}: {err}"[:200])


async def over_cap(url: str) -> str:
    import websockets

    try:
        async with websockets.connect(url, open_timeout=30) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 30)).get("error", "no error")
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:200]


async def poll_health(base: str, deadline: float, times: list[float], failures: list[str]) -> None:
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/health", timeout=10).read())
            times.append(time.perf_counter() - t0)
        except Exception as err:
            failures.append(str(err)[:200])
        await asyncio.sleep(0.5)


async def load(base: str, args) -> dict:
    url = base.replace("http", "ws", 1) + "/ws/stream"
    start = time.monotonic()
    deadline = start + args.seconds
    out: dict = {}
    health_times: list[float] = []
    health_failures: list[str] = []
    tasks = [asyncio.create_task(client(url, i, args, deadline, out)) for i in range(args.clients)]
    poller = asyncio.create_task(poll_health(base, deadline, health_times, health_failures))
    await asyncio.sleep(min(3.0, args.seconds / 4))
    busy = await over_cap(url)
    await asyncio.gather(*tasks, poller)
    elapsed = time.monotonic() - start
    latencies = [x for s in out.values() for x in s["latency"]]
    frames = sum(s["frames"] for s in out.values())
    return {
        "frames_delivered": frames,
        "chunks_delivered": sum(s["chunks"] for s in out.values()),
        "frames_per_s_total": round(frames / elapsed, 2),
        "frames_per_s_per_client": [round(out[i]["frames"] / elapsed, 2) for i in sorted(out)],
        "errors": sum(len(s["errors"]) for s in out.values()),
        "error_samples": sorted({e for s in out.values() for e in s["errors"]})[:10],
        "prompt_switches": sum(s["switches"] for s in out.values()),
        "chunk_latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                            "max": max(latencies) if latencies else None,
                            "mean": round(statistics.fmean(latencies), 4) if latencies else None},
        "over_cap_client_got": busy,
        "health_latency_s": {"p50": percentile(health_times, 50), "p95": percentile(health_times, 95),
                             "max": round(max(health_times), 4) if health_times else None,
                             "failures": len(health_failures)},
        "elapsed_s": round(elapsed, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--fps", type=float, default=8.0, help="playback fps each client asks for (0: unpaced)")
    p.add_argument("--switch-every", type=float, default=5.0, help="seconds between prompt switches (0: none)")
    p.add_argument("--checkpoint", default=None, help="default: a tiny random-weight checkpoint")
    p.add_argument("--threads", type=int, default=None, help="server's torch threads (default: all cores)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "serve_load.json"))
    args = p.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.seconds <= 600):
        p.error("keep it bounded: 1..64 clients, 1..600 seconds")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from selfforcing.models import CausalWanModel

            checkpoint = os.path.join(tmp, "tiny")
            CausalWanModel.from_preset("tiny").save_pretrained(checkpoint)
        port = free_port()
        cmd = [sys.executable, "-m", "selfforcing.cli", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
               "--port", str(port), "--max-sessions", str(args.clients), "--log-level", "warning"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "log"), "w"))
        base = f"http://127.0.0.1:{port}"
        try:
            t0 = time.monotonic()
            while True:  # wait (bounded) for the server to answer
                try:
                    urllib.request.urlopen(base + "/health", timeout=2).read()
                    break
                except Exception:
                    if server.poll() is not None or time.monotonic() - t0 > 120:
                        raise SystemExit("the server did not start:\n"
                                         + open(os.path.join(tmp, "log")).read()) from None
                    time.sleep(0.2)
            startup = time.monotonic() - t0
            model = json.loads(urllib.request.urlopen(base + "/models", timeout=10).read())["models"][0]
            result = asyncio.run(load(base, args))
            result["server_alive_after"] = server.poll() is None
            t1 = time.monotonic()  # every session is freed once its client has gone (bounded wait)
            while True:
                result["health_after"] = json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())
                if result["health_after"]["sessions"] == 0 or time.monotonic() - t1 > 15:
                    break
                time.sleep(0.1)
            result["sessions_freed_after_s"] = round(time.monotonic() - t1, 2)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    report = {
        "benchmark": "serve_load",
        "clients": args.clients, "seconds": args.seconds, "fps_requested": args.fps or None,
        "switch_every_s": args.switch_every,
        "checkpoint": args.checkpoint or "tiny preset, random weights",
        "parameters": model["parameters"], "window_frames": model["window_frames"],
        "frame_size": model["frame_size"], "server_startup_s": round(startup, 2),
        **result,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2 shared cores; server and clients on the same machine"},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: report[k] for k in ("frames_delivered", "frames_per_s_total", "errors", "chunk_latency_s",
                                             "over_cap_client_got", "health_latency_s")}))
    return 0 if result["errors"] == 0 and result["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
