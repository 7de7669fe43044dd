"""Judge a Moving-Digits generator on the prompts users will try: is the prompt's digit drawn, does it stay that
digit over a long stream, and does it move the captioned way -- held-out captions included -- against real clips.

    .venv/bin/python benchmarks/digit_rate.py moving-digits        # the shipped model (any checkpoint folder works)
    .venv/bin/python benchmarks/digit_rate.py runs/tiny/teacher/final  # a teacher: its own 12-frame samples
    .venv/bin/python benchmarks/digit_rate.py real                 # real clips of the same prompts, same judge
    .venv/bin/python benchmarks/digit_rate.py moving-digits --digits 3,4 --directions-per-digit 2 --seeds 1 \\
        --frames 36 --threads 1 --out /tmp/dr.json                  # a cheap smoke run

Prompts: every digit 0-9 (``--digits``) in 4 directions (``--directions-per-digit``): first the digit's held-out
direction k_h = -d mod 8 (the caption "the digit d moves DIR" never seen in training; so the ten held-out test
captions are all in the set), then the opposite one (k_h + 4) and the two perpendicular ones (k_h + 2, k_h + 6),
all training captions (each digit gets the 4 straight or the 4 diagonal directions; over the 10 digits each of the
8 directions is asked 5 times). Each prompt with ``--seeds`` seeds (default 2: 0 and 1) -> 80 videos of
``--frames`` (default 120) frames.

* A few-step (Self Forcing) checkpoint streams each prompt through the rolling KV cache
  (:class:`selfforcing.inference.StreamingGenerator`, seed = the seed), whose window is the model's training length
  (``--window-frames``, ``--sink-frames``; 0 for a cache over the whole video).
* A checkpoint whose ``pipeline.json`` names a many-step sampler (the teacher, TF / DF) is sampled with it
  (Euler + CFG, :func:`selfforcing.pipeline.sample_many_step`) over its training length (``--frames`` is capped
  there, 12 for the tiny teacher): its own samples, judged like the rest (one 12-frame window). ``--guidance-scale``
  and ``--num-steps`` replace the pipeline's CFG scale and Euler steps (both recorded in the result).
* ``real``: for each prompt and seed s, the s-th clip of one digit whose caption is the prompt (split ``test`` for
  held-out captions, ``train`` otherwise; images from the first ``--images-per-digit`` MNIST images of each class,
  default 4 as the shipped model's data, ``all`` for every image; ``--start``: where their digits start). A
  checkpoint's run also judges these clips (from its ``pipeline.json`` data settings) as ``reference``
  (``--no-reference`` skips that).

The judge (:mod:`selfforcing.eval.metrics`, one digit detection per frame, the same code for real and generated
videos): ``captioned_digit_rate`` = share of frames whose detected digit is the prompt's with probability > 0.5
(``confident_digit_rate``: any digit > 0.9), overall, ``per_digit`` (``min_digit_rate``), ``per_window`` of
``--window`` (12) frames, ``last_window_rate`` (the last 12 frames), ``by_caption`` (held-out vs train);
``identity_persistence`` = share of a video's confidently read frames that read the digit it started as
(:func:`~selfforcing.eval.metrics.identity_persistence`; ``same_digit_rate``: videos whose every window keeps it);
``direction_agreement`` = share of videos whose digit's centroid, over the first 12 frames up to its first wall
bounce, moved within 45 degrees of the caption's direction
(:func:`~selfforcing.eval.metrics.direction_agreement`; ``all``, ``held_out``, ``train``); real clips score 95%
here (76 of the 80; 96.5% of 600 clips): the rest start against a wall and bounce on their first step, so even
their first frames show the other way. ``flip_rate`` =
:func:`~selfforcing.eval.metrics.temporal_flip_rate` (one digit per frame). ``per_video`` has each video's numbers.
Prints one JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from selfforcing.data.moving_digits import DIRECTION_NAMES, START_POSITIONS, caption_for, is_held_out, render_clip
from selfforcing.eval.metrics import (
    captioned_reads,
    direction_agreement,
    identity_persistence,
    one_digit_tracks,
    temporal_flip_rate,
)

# direction offsets from a digit's held-out direction, in the order --directions-per-digit takes them
DIRECTION_OFFSETS = (0, 4, 2, 6, 1, 5, 3, 7)


def held_out_direction(digit: int) -> int:
    """The one direction index k with (digit + k) % 8 == 0 (:func:`is_held_out`)."""
    return (-int(digit)) % 8


def prompt_set(digits=range(10), directions_per_digit: int = 4) -> list[tuple[int, int]]:
    """(digit, direction index) pairs: per digit its held-out direction, then the opposite, then the perpendicular
    ones (``DIRECTION_OFFSETS``), ``directions_per_digit`` of them."""
    if not 1 <= int(directions_per_digit) <= 8:
        raise ValueError(f"directions per digit must be in 1..8, got {directions_per_digit}")
    out = []
    for d in digits:
        if not 0 <= int(d) <= 9:
            raise ValueError(f"digits are 0..9, got {d}")
        out += [(int(d), (held_out_direction(d) + o) % 8) for o in DIRECTION_OFFSETS[:int(directions_per_digit)]]
    return out


def real_clip_indices(prompts, per_prompt: int, images_per_digit: int | None, max_index: int = 200_000) -> dict:
    """{(digit, k): [(split, index), ...]}: the first ``per_prompt`` one-digit clips whose caption is the prompt,
    from split ``test`` for a held-out pair, ``train`` otherwise (a clip's caption does not depend on its length, so
    the search renders 1 frame per clip)."""
    want = {p: [] for p in prompts}
    for split in ("train", "test"):
        todo = {p for p in want if is_held_out(*p) == (split == "test")}
        i = 0
        while any(len(want[p]) < per_prompt for p in todo):
            if i >= max_index:
                raise RuntimeError(f"no {per_prompt} {split} clips for every prompt in {max_index} clips")
            c = render_clip(split, i, num_frames=1, num_digits=(1, 1), images_per_digit=images_per_digit)
            key = (int(c["labels"][0]), DIRECTION_NAMES.index(c["directions"][0]))
            if key in todo and len(want[key]) < per_prompt:
                want[key].append((split, i))
            i += 1
    return want


def real_videos(prompts, seeds: int, frames: int, images_per_digit: int | None, start: str = "uniform"):
    """Gray real clips float [B, F, H, W] in [-1, 1] for prompts x seeds (s-th matching clip; a clip's caption does
    not depend on ``start``, where its digit starts), and their sources."""
    where = real_clip_indices(prompts, seeds, images_per_digit)
    videos, sources = [], []
    for p in prompts:
        for s in range(seeds):
            split, index = where[p][s]
            clip = render_clip(split, index, num_frames=frames, num_digits=(1, 1), images_per_digit=images_per_digit,
                               start=start)
            if clip["caption"] != caption_for([p[0]], [p[1]]):
                raise RuntimeError(f"{split} clip {index} is {clip['caption']!r}, not the prompt {p}")
            videos.append(clip["video"][:, 0])
            sources.append({"split": split, "index": index})
    return torch.stack(videos), sources


def _rate(mask: torch.Tensor) -> float | None:
    return float(mask.float().mean()) if mask.numel() else None


def _nanmean(values: torch.Tensor) -> float | None:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else None


def judge(gray: torch.Tensor, digits, directions, held_out, window: int = 12, model=None) -> dict:
    """Every number of the benchmark for one-digit videos ``gray`` float [B, F, H, W] in [-1, 1] (channel-mean
    frames; they are judged as 3 equal channels), the prompts' ``digits`` [B], direction indices [B] and held-out
    flags [B]. One :func:`one_digit_tracks` detection for everything but the flip rate. Returns (summary, per_video)."""
    b, f = gray.shape[:2]
    videos = gray[:, :, None].expand(b, f, 3, *gray.shape[-2:])  # a view: 3 channels without the memory
    digits = torch.as_tensor(digits, dtype=torch.int64)
    held = torch.as_tensor(held_out, dtype=torch.bool)
    tracks = one_digit_tracks(videos, model=model)
    cap, conf = captioned_reads(tracks, digits), tracks["confident"]
    ident = identity_persistence(tracks["labels"].masked_fill(~conf, -1), window=window)
    motion = direction_agreement(tracks["centers"], directions, frames=min(window, f), size=tracks["size"]) \
        if f >= 2 else {"agree": torch.zeros(b, dtype=torch.bool), "displacement": torch.full((b, 2), math.nan),
                        "angle": torch.full((b,), math.nan)}
    flips = temporal_flip_rate(videos, max_digits=1, reduce=False, model=model) if f >= 2 else torch.zeros(b)
    starts = list(range(0, f, window))
    per_digit = {int(d): _rate(cap[digits == d]) for d in sorted(set(digits.tolist()))}
    agree = motion["agree"]

    def split_of(mask):
        return {"n_videos": int(mask.sum()), "captioned_digit_rate": _rate(cap[mask]),
                "identity_persistence": _nanmean(ident["persistence"][mask]),
                "direction_agreement": _rate(agree[mask])}

    pers = ident["persistence"]
    summary = {
        "n_videos": b, "frames": f, "n_frames": b * f, "window": window,
        "captioned_digit_rate": _rate(cap), "confident_digit_rate": _rate(conf),
        "mean_top_prob": float(tracks["probs"].mean()),
        "per_digit": per_digit, "min_digit_rate": min(per_digit.values()),
        "min_digit": min(per_digit, key=per_digit.get),
        "per_window": [_rate(cap[:, s:s + window]) for s in starts],
        "last_window_rate": _rate(cap[:, max(f - window, 0):]),
        "per_digit_per_window": {int(d): [_rate(cap[digits == d, s:s + window]) for s in starts] for d in per_digit},
        "identity_persistence": _nanmean(pers),
        "same_digit_rate": _rate(ident["same_digit"]),
        "starts_as_prompt_digit": _rate(ident["reference"] == digits),
        "direction_agreement": {"all": _rate(agree), "held_out": _rate(agree[held]), "train": _rate(agree[~held]),
                                "n_held_out": int(held.sum()), "n_train": int((~held).sum())},
        "flip_rate": float(flips.mean()),
        "by_caption": {"held_out": split_of(held), "train": split_of(~held)},
    }
    per_video = []
    for i in range(b):
        per_video.append({
            "digit": int(digits[i]), "direction": DIRECTION_NAMES[int(directions[i])], "held_out": bool(held[i]),
            "captioned_digit_rate": _rate(cap[i]), "confident_digit_rate": _rate(conf[i]),
            "per_window": [round(_rate(cap[i, s:s + window]), 3) for s in starts],
            "starts_as": int(ident["reference"][i]),
            "identity_persistence": _nanmean(pers[i:i + 1]),
            "same_digit": bool(ident["same_digit"][i]), "direction_ok": bool(agree[i]),
            "displacement": [None if math.isnan(v) else round(float(v), 2) for v in motion["displacement"][i]],
            "flip_rate": float(flips[i]),
        })
    return summary, per_video


def _images_per_digit(text: str | None, default: int | None) -> int | None:
    if text is None:
        return default
    return None if text == "all" else int(text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="'real', a shipped model name or a checkpoint folder")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits (default all ten)")
    p.add_argument("--directions-per-digit", type=int, default=4,
                   help="1..8: the held-out direction, then the opposite, then the perpendicular ones (default 4)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per prompt (real: the N first matching clips)")
    p.add_argument("--frames", type=int, default=120, help="frames per video (a many-step model: at most its "
                                                            "training length)")
    p.add_argument("--window", type=int, default=12, help="frames per window; motion is judged on the first one")
    p.add_argument("--images-per-digit", default=None,
                   help="real clips' MNIST pool per class: N or 'all' (default: the checkpoint's data, else 4)")
    p.add_argument("--window-frames", type=int, default=None,
                   help="a streaming model's rolling KV-cache window in latent frames (default: its training length, "
                        "as Self Forcing streams; 0: a cache over the whole video)")
    p.add_argument("--sink-frames", type=int, default=None,
                   help="frames of the rolling window kept as sinks (default: the model config's sink_size)")
    p.add_argument("--start", default=None, choices=START_POSITIONS,
                   help="where real clips' digits start (default: the checkpoint's training clips; real: uniform)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="a many-step sampler's classifier-free guidance (default: the pipeline's)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="a many-step sampler's Euler steps (default: the pipeline's)")
    p.add_argument("--no-reference", action="store_true", help="a checkpoint's run: skip judging the real clips")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.seeds < 1 or args.frames < 1 or args.window < 1 or (args.num_steps is not None and args.num_steps < 1):
        p.error("--seeds, --frames, --window and --num-steps must be >= 1")
    prompts = prompt_set([int(d) for d in args.digits.split(",") if d.strip()], args.directions_per_digit)
    digits = [d for d, _ in prompts for _ in range(args.seeds)]
    directions = [k for _, k in prompts for _ in range(args.seeds)]
    held = [is_held_out(d, k) for d, k in zip(digits, directions)]
    seeds = [s for _ in prompts for s in range(args.seeds)]
    captions = [caption_for([d], [k]) for d, k in prompts]
    result = {"benchmark": "digit_rate", "what": args.what, "prompts": captions, "seeds": args.seeds,
              "held_out_prompts": [c for c, pr in zip(captions, prompts) if is_held_out(*pr)]}
    t0 = time.perf_counter()
    if args.what == "real":
        ipd = _images_per_digit(args.images_per_digit, 4)
        start = args.start or "uniform"
        gray, sources = real_videos(prompts, args.seeds, args.frames, ipd, start)
        result.update(sampler="real", images_per_digit=ipd, start=start)
    else:
        from selfforcing.inference import StreamingGenerator
        from selfforcing.pipeline import load_pipeline, sample_many_step

        model, ae, text, spec = load_pipeline(args.what, device=args.device)
        overrides = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("num_steps", args.num_steps))
                     if v is not None}
        if overrides and spec.sampler == "few-step":
            p.error("--guidance-scale and --num-steps set a many-step sampler; a few-step generator has neither")
        spec = dataclasses.replace(spec, **overrides)
        trained_on = spec.clip_settings()
        ipd = _images_per_digit(args.images_per_digit, trained_on["images_per_digit"])
        start = args.start or trained_on["start"]
        gen = None
        if spec.sampler == "few-step":
            window = spec.training_frames // ae.temporal_compression if args.window_frames is None \
                else args.window_frames
            gen = StreamingGenerator(model, ae, text, spec.latent_size, steps=spec.warped_steps().tolist(),
                                     max_frames=args.frames + 64, negative_prompt=spec.negative_prompt,
                                     window_frames=window or None, sink_frames=args.sink_frames if window else None)
            result.update(window_frames=window or None, sink_frames=gen.sink)
        elif spec.training_frames:  # the teacher (or a TF / DF model): its own sampler, over its training length
            args.frames = min(args.frames, spec.training_frames)
        t = ae.temporal_compression
        latent = 1 + -(-(args.frames - 1) // t)  # enough latent frames for args.frames pixel frames
        videos = []
        for i, (d, k, s) in enumerate(zip(digits, directions, seeds)):
            prompt = caption_for([d], [k])
            if gen is not None:
                video = torch.cat([c.frames for c in gen.stream(prompt, num_latent_frames=latent, seed=s)])
            else:
                video = sample_many_step(model, ae, text, spec, prompt, latent, seed=s)
            videos.append(video[:args.frames].float().cpu().mean(1))
            print(f"[{i + 1}/{len(digits)}] {prompt!r} seed {s}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        gray, sources = torch.stack(videos), None
        result.update(sampler=spec.sampler, images_per_digit=ipd)
        if spec.sampler != "few-step":
            result.update(num_steps=spec.num_steps, guidance_scale=spec.guidance_scale)
    result["generate_seconds"] = round(time.perf_counter() - t0, 1)
    summary, per_video = judge(gray, digits, directions, held, window=args.window)
    result.update(summary)
    result["per_video"] = [{"prompt": caption_for([d], [k]), "seed": s, **rec, **({"clip": src} if src else {})}
                           for d, k, s, rec, src in zip(digits, directions, seeds, per_video,
                                                        sources or [None] * len(per_video))]
    if args.what != "real" and not args.no_reference:
        ref, _ = judge(real_videos(prompts, args.seeds, args.frames, ipd, start)[0], digits, directions, held,
                       window=args.window)
        result["reference"] = {"what": "real", "images_per_digit": ipd, "start": start, **ref}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
