"""`selfforcing eval`: compare generators on Moving-Digits over long rollouts (quality, adherence, drift per time
window; GT KV cache vs own rollout), resumable. The logic is :mod:`selfforcing.eval` (``evaluate``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from selfforcing.commands.argtypes import range_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH[:SAMPLER]",
                   help="a method: generator checkpoint (save_pretrained folder or file) and sampler: few-step "
                        "(default; Self Forcing, CausVid, ODE init), many-step (CFG Euler chunk by chunk; teacher / "
                        "diffusion forcing) or bidirectional (the teacher). Repeat for several methods")
    p.add_argument("--methods", default=None, metavar="FILE",
                   help="JSON / YAML list of methods {name, checkpoint, sampler, num_steps, guidance_scale, shift, "
                        "steps, preset, use_ema} (with or instead of --checkpoint)")
    p.add_argument("--prompts", default="16", metavar="FILE_OR_N",
                   help="N: the captions of Moving-Digits test clips 0..N-1 (their frames are the GT context); or a "
                        "prompt file (then no GT-cache runs). Default 16")
    p.add_argument("--num-samples", type=int, default=16, help="videos per method and length (sample i: prompt i "
                   "mod P, seed SEED + i). Default 16")
    p.add_argument("--lengths", default="1,5,10", help="multiples of the training length (default 1,5,10)")
    p.add_argument("--train-frames", type=int, default=12, help="pixel frames of the training clips (default 12)")
    p.add_argument("--window", type=int, default=None, help="metric window in pixel frames (default: --train-frames)")
    p.add_argument("--out", required=True, help="output folder: results.json, report.md, plots/, samples/, cache/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples generated together (default 8)")
    p.add_argument("--window-frames", type=int, default=None,
                   help="rolling KV window in latent frames (default: the training length; 0: global cache)")
    p.add_argument("--sink-frames", type=int, default=0, help="sink frames kept in the rolling window")
    p.add_argument("--steps", default="1000,750,500,250", help="nominal few-step list (warped with the shift)")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift (default: the training run's timestep_shift from the config.yaml beside "
                        "the checkpoint, else 5.0)")
    p.add_argument("--num-steps", type=int, default=50, help="Euler steps of the many-step / bidirectional samplers")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="CFG weight of the many-step samplers")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--bidirectional-stride", type=int, default=None,
                   help="new latent frames per sliding window of the bidirectional sampler (default: half the "
                        "training length)")
    p.add_argument("--num-digits", type=range_of(int), default=None, metavar="LO,HI",
                   help="digits per real test clip (default: the first checkpoint's pipeline.json dataset, else 1,2)")
    p.add_argument("--images-per-digit", type=int, default=None, metavar="K",
                   help="real clips draw each class from its first K MNIST images (default: the first checkpoint's "
                        "pipeline.json dataset, else all)")
    p.add_argument("--num-real", type=int, default=64, help="real test clips in the reference set (default 64)")
    p.add_argument("--no-gt-cache", action="store_true", help="skip the GT KV cache runs (train-test gap)")
    p.add_argument("--no-real", action="store_true", help="skip the real-clip baseline row")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--preset", default="tiny", help="architecture of checkpoint files (default tiny)")
    p.add_argument("--autoencoder", default="moving-digits")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens (default: 24 for minilm, Wan's length for UMT5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _prompts(text: str) -> tuple[list[str] | None, int]:
    """``--prompts``: (None, N) for a number N of test-clip captions, or (the file's prompts, 16) for a file."""
    from selfforcing.data.prompts import read_prompt_file  # here: the selfforcing.data package loads torch

    if text.strip().isdigit():
        num_prompts = int(text)
        if num_prompts < 1:
            raise ValueError(f"--prompts N needs N >= 1, got {text}")
        return None, num_prompts
    if not os.path.isfile(text):
        raise FileNotFoundError(f"--prompts: neither a number nor an existing prompt file: {text}")
    return read_prompt_file(text), 16


def run(args: argparse.Namespace) -> int:
    """Parse the methods and settings, run :func:`selfforcing.eval.evaluate.evaluate`, print where it wrote."""
    # The library loads here, not at the top: `selfforcing eval --help` and argument errors skip torch (seconds).
    import torch

    from selfforcing.eval.evaluate import evaluate
    from selfforcing.eval.specs import (
        EvalSettings,
        load_method_specs,
        parse_checkpoint_arg,
        parse_lengths,
        real_clip_settings,
    )

    methods = load_method_specs(args.methods) if args.methods else []
    for item in args.checkpoint:
        spec = parse_checkpoint_arg(item)
        spec.preset = args.preset
        methods.append(spec)
    if not methods:
        raise ValueError("give at least one method: --checkpoint NAME=PATH[:SAMPLER] or --methods FILE")
    lengths = parse_lengths(args.lengths)
    prompts, num_prompts = _prompts(args.prompts)
    steps = [float(v) for v in args.steps.split(",")]
    num_digits, images_per_digit = real_clip_settings(methods[0].checkpoint, args.num_digits, args.images_per_digit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(
        out_dir=args.out, lengths=lengths, num_samples=args.num_samples, num_prompts=num_prompts, prompts=prompts,
        train_frames=args.train_frames, window=args.window, seed=args.seed, batch_size=args.batch_size,
        kv_window=args.window_frames, sink_frames=args.sink_frames, few_steps=steps, shift=args.shift,
        num_steps=args.num_steps, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
        bidirectional_stride=args.bidirectional_stride, num_real=args.num_real, gt_cache=not args.no_gt_cache,
        real_baseline=not args.no_real, bootstrap=args.bootstrap, autoencoder=args.autoencoder,
        text_encoder=args.text_encoder, text_len=args.text_len, num_digits=num_digits,
        images_per_digit=images_per_digit, device=device)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = evaluate(methods, settings, log=log)
    print(json.dumps({"results": os.path.join(args.out, "results.json"), "report": os.path.join(args.out, "report.md"),
                      "plots": len(results["plots"]), "rows": len(results["rows"]), "seconds": results["seconds"]}))
    return 0
