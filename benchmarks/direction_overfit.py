"""Can a model learn where a caption's direction puts the digit? Fit a handful of clips of one digit moving two
opposite ways, at high noise, and watch the gap between the true and the swapped caption.

    .venv/bin/python benchmarks/direction_overfit.py CHECKPOINT --store runs/tiny2/store [--digit 3]
        [--directions up,down] [--clips-per-direction 8] [--steps 100] [--lr 6e-4] [--caption-layout R] [--out FILE]

The clips are the first ``--clips-per-direction`` records of the store captioned "the digit D moves X" for each of
the two directions (a store encoded with ``--start behind``, so a direction decides where the digit starts). The
model (a bidirectional teacher; a training checkpoint keeps its architecture) trains on exactly these clips with
AdamW at timesteps t = 1000 * 50u / (1 + 49u), u ~ U(0, 1) (the uniform draw shifted by 50: nearly all above 0.9),
where the prediction is all but the caption's mean. Every ``--every`` steps the loss at t = 980 (fixed noise) is taken
with the true captions and with the two directions' captions swapped
(:func:`selfforcing.eval.conditioning.flow_loss_by_context`): ``gap`` = loss(swapped) - loss(true). ``ideal_gap``
is what predicting each direction's own mean instead of the other's is worth, ||m_a - m_b||^2 per element: a model
that can place a digit by its caption closes most of it within these steps; one that cannot stays near 0 while its
loss falls. ``--caption-layout R`` adds a caption layout of rank R (model option ``caption_layout_rank``, its maps
sized to the clips) to the checkpoint's model before training.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfforcing import flow
from selfforcing.data.store import Store
from selfforcing.eval.conditioning import flow_loss_by_context
from selfforcing.models import CausalWanModel
from selfforcing.training.losses import flow_matching_loss

HIGH_NOISE_SHIFT = 50.0  # the training timesteps' shift: t = 1000 * 50u / (1 + 49u)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--store", required=True)
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--directions", default="up,down")
    p.add_argument("--clips-per-direction", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--caption-layout", type=int, default=0, metavar="R")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    store = Store(args.store)
    dirs = args.directions.split(",")
    if len(dirs) != 2:
        raise SystemExit("--directions takes two directions, e.g. up,down")
    picked = []
    for d in dirs:
        caption = f"the digit {args.digit} moves {d}"
        found = [i for i in range(len(store)) if store.metadata(i).get("caption") == caption][:args.clips_per_direction]
        if len(found) < args.clips_per_direction:
            raise SystemExit(f"{args.store} holds {len(found)} clips captioned {caption!r}, "
                             f"need {args.clips_per_direction}")
        picked.append(found)
    idx = picked[0] + picked[1]
    n = args.clips_per_direction
    x0 = torch.stack([store.get(i, ("latents",))["latents"] for i in idx])
    ctx = torch.stack([store.get(i, ("context",))["context"] for i in idx])
    swapped = torch.cat([ctx[n:], ctx[:n]])
    ideal = float((x0[:n].mean(0) - x0[n:].mean(0)).pow(2).mean())
    model = CausalWanModel.from_checkpoint(args.checkpoint)
    if args.caption_layout:
        _, ph, pw = model.config.patch_size
        f, _, h, w = x0.shape[1:]
        model = model.with_overrides(caption_layout_rank=args.caption_layout, caption_layout_size=(f, h // ph, w // pw))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    eval_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

    def probe(step: int) -> dict:
        losses = flow_loss_by_context(model, x0, {"true": ctx, "swapped": swapped}, [980.0], noise=eval_noise)
        true, swap = losses["true"][0], losses["swapped"][0]
        return {"step": step, "loss_true": round(true, 5), "gap": round(swap - true, 5)}

    rows, t0 = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            rows.append({**probe(step), "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
        if step == args.steps:
            break
        t = flow.training_timesteps(torch.rand(len(idx), generator=g), distribution="uniform", shift=HIGH_NOISE_SHIFT)
        eps = torch.randn(x0.shape, generator=g)
        loss = flow_matching_loss(model(flow.add_noise(x0, eps, t), t, ctx, causal=False), x0, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = {"benchmark": "direction_overfit", "checkpoint": args.checkpoint, "store": args.store,
              "captions": [f"the digit {args.digit} moves {d}" for d in dirs], "clips": len(idx), "lr": args.lr,
              "caption_layout_rank": model.config.caption_layout_rank,
              "ideal_gap": round(ideal, 5), "probes": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "probes"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
