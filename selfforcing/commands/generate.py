"""`selfforcing generate`: stream a video for each prompt with the few-step KV-cache sampler, write mp4 (the logic:
:mod:`selfforcing.generate`).

Memory stays flat however long the video: the KV cache rolls over a window of the model's training length (from
``pipeline.json``) unless ``--window-frames 0`` asks for a cache over the whole video (refused up front, with both
sizes, when it would not fit), and every chunk is encoded into the mp4 as soon as it is decoded. The output paths
are checked for writability before the model loads, and a run that fails or is stopped leaves no file behind (the
mp4 is written to a temp file and renamed when complete).
"""

from __future__ import annotations

import argparse
import json

from selfforcing.errors import UsageError
from selfforcing.fileio import check_writable


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append",
                     help="a prompt (repeat for several videos; default: the checkpoint's default prompt)")
    src.add_argument("--prompts", help="a prompt file (one prompt a line)")
    src.add_argument("--unconditional", action="store_true",
                     help="no prompt: condition on the null prompt the model was trained with (an empty --prompt is "
                          "an error)")
    p.add_argument("--checkpoint", default=None,
                   help="generator: a shipped model's name (default: moving-digits, the tiny causal model trained on "
                        "Moving-Digits), a save_pretrained folder, a training checkpoint, or an original Wan / "
                        "CausVid / Self Forcing .pt (with --preset). A folder's pipeline.json gives the defaults of "
                        "the sampler options below")
    p.add_argument("--preset", default="tiny", help="architecture of a checkpoint file (default: tiny)")
    p.add_argument("--use-ema", action="store_true", help="load generator_ema from a training checkpoint")
    p.add_argument("--num-frames", type=int, default=48, help="pixel frames to generate")
    p.add_argument("--window-frames", type=int, default=None,
                   help="rolling KV window in latent frames (default for a streaming model: its training length "
                        "from pipeline.json, as the server streams; 0: a cache over the whole video)")
    p.add_argument("--sink-frames", type=int, default=None, help="sink frames kept in the window")
    p.add_argument("--steps", default=None, help="nominal few-step list, warped with --shift (default: the "
                                                    "checkpoint's, else 1000,750,500,250)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the checkpoint's, else 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder", default=None, help="default: the checkpoint's, else moving-digits")
    p.add_argument("--text-encoder", default=None, help="default: the checkpoint's, else minilm")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the checkpoint's, else 24 for "
                                                             "minilm, Wan's length for UMT5)")
    p.add_argument("--latent-size", default=None, help="h,w of the latents (default: the checkpoint's, else 16,16)")
    p.add_argument("--switch", action="append", default=[], metavar="CHUNK:PROMPT",
                   help="switch to PROMPT before chunk CHUNK (repeatable)")
    p.add_argument("--recache", action="store_true", help="rebuild the KV cache under the new prompt at a switch")
    p.add_argument("--init-video", default=None, help="continue from this video's frames (image-to-video: 1 frame)")
    p.add_argument("--sampler", default=None, choices=["few-step", "many-step", "bidirectional"],
                   help="few-step: streaming KV-cache sampler (Self Forcing, CausVid, ODE init); many-step: Euler "
                        "with CFG and separate conditional / unconditional caches, chunk by chunk (teacher / "
                        "diffusion forcing models); bidirectional: the teacher on the whole clip. Default: the "
                        "checkpoint's (pipeline.json), else few-step")
    p.add_argument("--num-steps", type=int, default=None, help="Euler steps of the many-step samplers")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG weight of the many-step samplers")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--fps", type=float, default=None, help="mp4 frame rate (default: the checkpoint's, else 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet of the (first) video here")
    p.add_argument("--out", required=True, help="mp4 path (several prompts: NAME_0.mp4, NAME_1.mp4, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object per video")


def _switches(args: argparse.Namespace) -> dict[int, tuple[str, bool]]:
    """``--switch CHUNK:PROMPT`` items as {chunk: (prompt, recache)}; a malformed or empty one is a UsageError."""
    switches = {}
    for item in args.switch:
        chunk, _, prompt = item.partition(":")
        if not chunk.isdigit() or not prompt.strip():
            raise UsageError(f"--switch must be CHUNK:PROMPT with a non-empty prompt, got {item!r}")
        switches[int(chunk)] = (prompt, args.recache)
    return switches


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts asked for (None: the checkpoint's default prompt); empty ones are errors naming the flag."""
    from selfforcing.data.prompts import read_prompt_file, require_prompt  # here: selfforcing.data loads torch

    if args.prompts:
        return read_prompt_file(args.prompts)  # blank lines are skipped; a file with none is an error
    if args.prompt:
        return [require_prompt(p, "--prompt") for p in args.prompt]
    return None


def _check_numbers(args: argparse.Namespace) -> None:
    """--num-frames and --window-frames in range (UsageError naming the flag)."""
    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.window_frames is not None and args.window_frames < 0:
        raise UsageError(f"--window-frames must be >= 0 (0: a cache over the whole video), got {args.window_frames}")


def _overrides(args: argparse.Namespace) -> dict:
    """The pipeline.json fields the flags change (None: the checkpoint's)."""
    overrides = dict(sampler=args.sampler, autoencoder=args.autoencoder, text_encoder=args.text_encoder,
                     text_len=args.text_len, shift=args.shift, num_steps=args.num_steps,
                     guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, fps=args.fps)
    if args.steps:
        overrides["denoising_steps"] = tuple(float(s) for s in args.steps.split(","))
    if args.latent_size:
        overrides["latent_size"] = tuple(int(v) for v in args.latent_size.split(","))
    return overrides


def _print_report(report: dict, as_json: bool) -> None:
    """One line per video: the report as JSON, or a sentence."""
    print(json.dumps(report) if as_json else f"{report['path']}: {report['frames']} frames in "
          f"{report['seconds']:.2f} s ({report['fps']} fps, first chunk {report['first_chunk_latency_s']} s)",
          flush=True)


def run(args: argparse.Namespace) -> int:
    """Generate a video per prompt (see the module doc); prints a report line per video."""
    # The library loads here, not at the top: `selfforcing generate --help` stays instant (torch and the models
    # take seconds to import; docs/performance.md).
    from selfforcing.generate import output_paths, streaming_generator, streaming_window, write_video
    from selfforcing.inference import CacheTooLarge
    from selfforcing.io import read_video, to_float_video
    from selfforcing.pipeline import load_pipeline

    _check_numbers(args)
    switches = _switches(args)
    prompts = _prompts(args)
    outs = output_paths(args.out, len(prompts) if prompts else 1)
    for path in outs + ([args.sheet] if args.sheet else []):
        check_writable(path)  # before any compute: a read-only destination fails now, not after the video
    prefix = to_float_video(read_video(args.init_video))[None] if args.init_video else None
    model, ae, text, spec = load_pipeline(args.checkpoint, preset=args.preset, use_ema=args.use_ema,
                                          device=args.device, **_overrides(args))
    if args.unconditional:
        prompts = [spec.negative_prompt]  # the null prompt of text dropout / CFG
    prompts = prompts or [spec.default_prompt]
    window = streaming_window(spec, ae, args.window_frames)
    try:
        gen = streaming_generator(model, ae, text, spec, latent_frames=ae.latent_frames(args.num_frames),
                                  window_frames=window, sink_frames=args.sink_frames,
                                  prefix_frames=ae.latent_frames(prefix.shape[1]) if prefix is not None else 0)
    except CacheTooLarge as err:
        raise MemoryError(f"a KV cache over the whole video ({err.frames} latent frames) needs {err.need / 1e9:.1f} "
                          f"GB and {err.have / 1e9:.1f} GB of memory is available: omit --window-frames (a rolling "
                          f"window of the training length), give --window-frames N, or fewer --num-frames") from None
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        report = write_video(out, gen, spec, prompt, num_frames=args.num_frames, seed=args.seed + i,
                             switches=switches, prefix=prefix, window_frames=args.window_frames or None,
                             sink_frames=args.sink_frames, sheet=args.sheet if i == 0 else None)
        _print_report({**report, "window_frames": window or None, "unconditional": bool(args.unconditional)}, args.json)
    return 0
