"""Score a teacher run's checkpoints by the prompt's digit in its samples, against the run's wall time.

    .venv/bin/python benchmarks/teacher_probe.py runs/probe_a [runs/probe_b ...] [--frames 1|12] [--ema]

For every ``step_*.pt`` in ``RUN/checkpoints`` (or only ``--steps``): the bidirectional teacher, loaded with
the run's own recipe (``RUN/config.yaml``: preset, overrides, autoencoder, text encoder, shift), samples one
video per prompt with its many-step sampler (``--num-steps`` Euler steps, CFG ``--guidance``), for every digit
0-9 in ``--per-digit`` directions (seeds fixed), over ``--frames`` latent frames (1: single frames, the image
probe; the training length: clips). The shipped digit classifier reads every decoded frame
(:func:`selfforcing.eval.metrics.one_digit_reads`): ``captioned`` = share of frames whose detected digit is the
prompt's (probability > 0.5), also per digit; for clips also the flip rate and the share of samples whose digit
moves within 45 degrees of the caption's direction (:func:`selfforcing.eval.metrics.motion_direction_agreement`).
The wall time of a checkpoint is the sum of ``seconds_per_step`` in ``metrics.jsonl`` up to its step, so runs of
different recipes compare at equal wall time. Prints JSON lines; ``--out`` writes them all as one JSON file.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import torch

from selfforcing.data.moving_digits import DIRECTION_NAMES
from selfforcing.eval.metrics import motion_direction_agreement, one_digit_reads, temporal_flip_rate


def wall_time_by_step(run: str) -> dict[int, float]:
    """Cumulative training seconds at each logged step of ``run`` (mean seconds per step x steps since the last
    log line, summed; a resumed run's repeated lines are taken once, the last one)."""
    lines = {}
    path = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                rec = json.loads(line)
                if "seconds_per_step" in rec:
                    lines[int(rec["step"])] = float(rec["seconds_per_step"])
    out, total, last = {}, 0.0, 0
    for step in sorted(lines):
        total += lines[step] * (step - last)
        out[step], last = total, step
    return out


def prompts(per_digit: int) -> list[tuple[int, str]]:
    """(digit, direction) for every digit, ``per_digit`` directions each, spread round the compass."""
    return [(d, DIRECTION_NAMES[(d + 3 * k) % 8]) for d in range(10) for k in range(per_digit)]


@torch.no_grad()
def score_checkpoint(path: str, cfg: dict, frames: int, per_digit: int, num_steps: int, guidance: float,
                     use_ema: bool, sheet: str | None = None, shift: float | None = None) -> dict:
    from selfforcing.autoencoders import get_autoencoder
    from selfforcing.models import CausalWanModel
    from selfforcing.sampling import sample_bidirectional
    from selfforcing.text import build_text_encoder

    gen = cfg["generator"]
    model = CausalWanModel.from_checkpoint(path, preset=gen["preset"], use_ema=use_ema,
                                           **(gen.get("overrides") or {})).eval()
    data = cfg["data"]
    ae = get_autoencoder(data["autoencoder"])
    text = build_text_encoder(data["text_encoder"], data["text_len"])
    sample = ae.encode(torch.zeros(1, 1, 3, data["size"], data["size"]))
    c, h, w = sample.shape[2:]
    pairs = prompts(per_digit)
    captions = [f"the digit {d} moves {k}" for d, k in pairs]
    ctx = text.encode(captions).states
    null = text.encode([data.get("negative_prompt", "")]).states.expand(len(pairs), -1, -1)
    noise = torch.randn(len(pairs), frames, c, h, w, generator=torch.Generator().manual_seed(0))
    x0, _ = sample_bidirectional(model, noise, ctx, null_context=null, num_steps=num_steps,
                                 shift=shift or float(cfg.get("timestep_shift", 3.0)),
                                 guidance_scale=guidance)
    video = ae.decode(x0)  # [P, F, 3, H, W]
    if sheet:  # the first frame of every sample, a row per digit
        from selfforcing.io import write_contact_sheet

        write_contact_sheet(sheet, video[:, 0], columns=per_digit * 2, labels=False)
    labels = torch.tensor([d for d, _ in pairs]).repeat_interleave(video.shape[1])
    reads = one_digit_reads(video.flatten(0, 1), labels)
    cap = reads["captioned"].float().view(len(pairs), -1)
    per_digit_rate = {str(d): float(cap[[i for i, (dd, _) in enumerate(pairs) if dd == d]].mean()) for d in range(10)}
    out = {"captioned": float(cap.mean()), "confident": float(reads["confident"].float().mean()),
           "per_digit": per_digit_rate, "min_digit": min(per_digit_rate.values())}
    if video.shape[1] > 1:
        out["flip_rate"] = temporal_flip_rate(video, max_digits=1)
        out["direction_agreement"] = float(motion_direction_agreement(video, [k for _, k in pairs],
                                                                      frames=video.shape[1]).float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--frames", type=int, default=1, help="latent frames per sample (1: single frames)")
    p.add_argument("--per-digit", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=24)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--shift", type=float, default=None, help="sampling shift (default: the run's timestep_shift)")
    p.add_argument("--ema", action="store_true", help="score the EMA weights")
    p.add_argument("--steps", default=None, help="comma-separated checkpoint steps (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sheets", action="store_true", help="write RUN/probe_step_N.png (first frame of each sample)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    results = []
    for run in args.runs:
        with open(os.path.join(run, "config.yaml")) as fh:
            cfg = yaml.safe_load(fh)
        times = wall_time_by_step(run)
        want = {int(s) for s in args.steps.split(",")} if args.steps else None
        for path in sorted(glob.glob(os.path.join(run, "checkpoints", "step_*.pt"))):
            step = int(re.search(r"step_(\d+)", path).group(1))
            if want is not None and step not in want:
                continue
            res = {"run": run, "step": step, "wall_s": round(times.get(step, float("nan")), 1), "ema": args.ema,
                   "frames": args.frames,
                   **score_checkpoint(path, cfg, args.frames, args.per_digit, args.num_steps, args.guidance,
                                      args.ema, sheet=os.path.join(run, f"probe_step_{step:06d}.png")
                                      if args.sheets else None, shift=args.shift)}
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"benchmark": "teacher_probe", "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
