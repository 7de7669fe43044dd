"""How often a generated frame holds a digit that the shipped digit classifier reads confidently, against real clips.

    .venv/bin/python benchmarks/digit_rate.py moving-digits        # the shipped model (any checkpoint folder works)
    .venv/bin/python benchmarks/digit_rate.py runs/tiny/teacher/final  # the teacher: 12 frames, 24 Euler steps, CFG
    .venv/bin/python benchmarks/digit_rate.py real                 # real Moving-Digits test clips, one digit each

8 one-digit prompts (8 digits, 4 directions) x 96 frames streamed through the generator's rolling cache (seed = prompt
index), or 8 real test clips of 96 frames. A checkpoint whose pipeline.json names a many-step sampler (the teacher)
is sampled with it (Euler + CFG, ``selfforcing.pipeline.sample_many_step``) over its training length instead.
Per frame, :func:`selfforcing.eval.metrics.one_digit_reads`: ``confident_digit_rate`` = share of frames with a
detected digit of probability > 0.9, ``captioned_digit_rate`` = share whose detected digit is the prompt's with
probability > 0.5; both also per video (``per_video``). Prints one JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json

import torch

from selfforcing.data.moving_digits import render_clip
from selfforcing.eval.metrics import one_digit_reads

PROMPTS = [(3, "right"), (7, "left"), (1, "up"), (5, "down"), (0, "right"), (8, "up"), (2, "left"), (9, "down")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="'real', a shipped model name or a checkpoint folder")
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    videos, labels = [], []
    if args.what == "real":
        for i in range(args.videos):
            clip = render_clip("test", i, num_frames=args.frames, num_digits=(1, 1))
            videos.append(clip["video"])
            labels.append(int(clip["labels"][0]))
    else:
        from selfforcing.pipeline import load_pipeline, sample_many_step
        from selfforcing.inference import StreamingGenerator

        model, ae, text, spec = load_pipeline(args.what)
        gen = None
        if spec.sampler == "few-step":
            gen = StreamingGenerator(model, ae, text, spec.latent_size, steps=spec.warped_steps().tolist(),
                                     max_frames=args.frames + 64, negative_prompt=spec.negative_prompt)
        else:  # the teacher (or a TF / DF model): its own sampler, over its training length
            args.frames = min(args.frames, spec.training_frames)
        for i in range(args.videos):
            digit, direction = PROMPTS[i % len(PROMPTS)]
            prompt = f"the digit {digit} moves {direction}"
            if gen is not None:
                video = torch.cat([c.frames for c in gen.stream(prompt, num_latent_frames=args.frames, seed=i)])
            else:
                video = sample_many_step(model, ae, text, spec, prompt, ae.latent_frames(args.frames), seed=i)
            videos.append(video[:args.frames])
            labels.append(digit)
    frames = torch.cat(videos)
    reads = one_digit_reads(frames, torch.tensor(labels).repeat_interleave(videos[0].shape[0]))
    confident, captioned, prob = reads["confident"], reads["captioned"], reads["probs"]
    per_video = [{"digit": d, "confident_digit_rate": float(c.float().mean()),
                  "captioned_digit_rate": float(k.float().mean())}
                 for d, c, k in zip(labels, confident.chunk(len(videos)), captioned.chunk(len(videos)))]
    result = {"benchmark": "digit_rate", "what": args.what, "frames": int(frames.shape[0]),
              "confident_digit_rate": float(confident.float().mean()),
              "captioned_digit_rate": float(captioned.float().mean()),
              "mean_top_prob": float(prob.mean()), "per_video": per_video}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
