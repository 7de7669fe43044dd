"""Does a model use the caption's digit and direction? Its flow-matching loss under changed captions.

    .venv/bin/python benchmarks/caption_sensitivity.py CHECKPOINT [CHECKPOINT ...] [--start uniform|behind]
        [--clips 48] [--timesteps 980,950,900,850,700,500] [--oracle-clips 3000] [--out FILE]

For each checkpoint (a folder or a training checkpoint file, loaded by ``load_pipeline``), ``--clips`` fresh
one-digit Moving-Digits clips (training images, indices after any store's) are encoded and noised with the
same noise at each timestep; the model's loss is taken with the true caption, with the direction reversed,
with the digit replaced, and with the null prompt (:func:`selfforcing.eval.conditioning.flow_loss_by_context`).
``gap_X = loss(X) - loss(true)``: what the model gains from the part of the caption that X changes. A model
that ignores the direction words has gap_opposite_direction = 0 however its samples happen to move.

A bidirectional model is also probed for time reversal at t = 980 and 500 on 16 of the clips
(:func:`selfforcing.eval.conditioning.time_reversal_residual`): "reversed" near 0 beside a large "permuted" means the
model cannot tell a clip from the same clip played backwards.

``--oracle-clips N`` also estimates what an ideal denoiser could gain at t -> 1 from the digit alone and from
the whole caption (:func:`selfforcing.eval.conditioning.group_mean_gain` on N clips' latents): the reference
scale for the gaps; ``*_global`` is the part of each gain that a layout-free prediction (one value per frame and
channel, the group's spatial mean) already takes. Prints JSON lines; ``--out`` writes them as one JSON file.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfforcing.data.moving_digits import START_POSITIONS, render_clip
from selfforcing.eval.conditioning import (
    VARIANTS,
    caption_variant,
    flow_loss_by_context,
    group_mean_gain,
    time_reversal_residual,
)
from selfforcing.pipeline import load_pipeline
from selfforcing.sampling import SAMPLERS

FIRST_INDEX = 50_000  # clip indices past the laptop stores' 10,000: clips no model was trained on


def clips(n: int, start: str, frames: int, first: int = FIRST_INDEX) -> list[dict]:
    return [render_clip("train", first + i, num_frames=frames, num_digits=(1, 1), images_per_digit=4, start=start)
            for i in range(n)]


@torch.no_grad()
def encode(autoencoder, items: list[dict], batch: int = 100) -> torch.Tensor:
    return torch.cat([autoencoder.encode(torch.stack([c["video"] for c in items[i:i + batch]]))
                      for i in range(0, len(items), batch)])


def sensitivity(checkpoint: str, start: str, n: int, timesteps: list[float], use_ema: bool,
                sampler: str | None = None) -> dict:
    model, ae, text, spec = load_pipeline(checkpoint, use_ema=use_ema, sampler=sampler)
    items = clips(n, start, frames=12)
    latents = encode(ae, items)
    captions = [c["caption"] for c in items]
    contexts = {"true": text.encode(captions).states,
                **{v: text.encode([caption_variant(c, v) for c in captions]).states for v in VARIANTS},
                "null": text.encode([spec.negative_prompt] * n).states}
    # the bidirectional teacher attends over the whole clip; a causal generator is scored as it runs (block-causal)
    bidirectional = spec.sampler == "bidirectional"
    losses = flow_loss_by_context(model, latents, contexts, timesteps, causal=not bidirectional)
    reversal = {str(int(t)): time_reversal_residual(model, latents[:16], contexts["true"][:16], t)
                for t in (980.0, 500.0)} if bidirectional else None
    return {"checkpoint": checkpoint, "ema": use_ema, "sampler": spec.sampler, "start": start, "clips": n,
            "timesteps": timesteps,
            "loss_true": losses["true"],
            **{f"gap_{k}": [round(a - b, 6) for a, b in zip(losses[k], losses["true"])] for k in [*VARIANTS, "null"]},
            "time_reversal": reversal}


def oracle(n: int, start: str) -> dict:
    from selfforcing.autoencoders import get_autoencoder

    items = clips(n, start, frames=12, first=FIRST_INDEX + 100_000)
    latents = encode(get_autoencoder("moving-digits"), items)
    digits, captions = [int(c["labels"][0]) for c in items], [c["caption"] for c in items]
    layout_free = latents.mean((-2, -1))  # [N, F, C]: each frame and channel's spatial mean
    return {"oracle": True, "start": start, "clips": n, "latent_variance": float(latents.var(0).mean()),
            "gain_digit": group_mean_gain(latents, digits), "gain_caption": group_mean_gain(latents, captions),
            "gain_digit_global": group_mean_gain(layout_free, digits),
            "gain_caption_global": group_mean_gain(layout_free, captions)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--start", default="uniform", choices=START_POSITIONS, help="where the clips' digits start")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--timesteps", default="980,950,900,850,700,500")
    p.add_argument("--oracle-clips", type=int, default=0, help="also estimate an ideal model's gains on N clips")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="how the checkpoints are run (default: their pipeline.json; bidirectional = a teacher)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    timesteps = [float(t) for t in args.timesteps.split(",")]
    rows = []
    for ckpt in args.checkpoints:
        t0 = time.perf_counter()
        rows.append({**sensitivity(ckpt, args.start, args.clips, timesteps, args.ema, args.sampler),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.oracle_clips:
        rows.append(oracle(args.oracle_clips, args.start))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"benchmark": "caption_sensitivity", "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
