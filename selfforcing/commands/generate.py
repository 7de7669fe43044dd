"""`selfforcing generate`: stream a video for each prompt with the few-step KV-cache sampler, write mp4."""

from __future__ import annotations

import argparse
import json
import os
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append",
                     help="a prompt (repeat for several videos; default: the checkpoint's default prompt)")
    src.add_argument("--prompts", help="a prompt file (one prompt a line)")
    p.add_argument("--checkpoint", default=None,
                   help="generator: a shipped model's name (default: moving-digits, the tiny causal model trained on "
                        "Moving-Digits), a save_pretrained folder, a training checkpoint, or an original Wan / CausVid / "
                        "Self Forcing .pt (with --preset). A folder's pipeline.json gives the defaults of the sampler "
                        "options below")
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
                                                             "minilm, 512 for UMT5)")
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


def run(args: argparse.Namespace) -> int:
    import torch

    from selfforcing.inference import StreamingGenerator
    from selfforcing.io import read_video, to_float_video, write_contact_sheet, write_mp4
    from selfforcing.pipeline import load_pipeline, sample_many_step

    if args.num_frames < 1:
        raise SystemExit(f"--num-frames must be >= 1, got {args.num_frames}")
    switches = {}
    for item in args.switch:
        chunk, _, prompt = item.partition(":")
        if not chunk.isdigit() or not prompt:
            raise SystemExit(f"--switch must be CHUNK:PROMPT, got {item!r}")
        switches[int(chunk)] = (prompt, args.recache)
    overrides = dict(sampler=args.sampler, autoencoder=args.autoencoder, text_encoder=args.text_encoder,
                     text_len=args.text_len, shift=args.shift, num_steps=args.num_steps,
                     guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, fps=args.fps)
    if args.steps:
        overrides["denoising_steps"] = tuple(float(s) for s in args.steps.split(","))
    if args.latent_size:
        overrides["latent_size"] = tuple(int(v) for v in args.latent_size.split(","))
    prompts = args.prompt
    if args.prompts:
        from selfforcing.data.prompts import read_prompt_file

        prompts = read_prompt_file(args.prompts)  # checked before the model loads: a bad file fails fast
    model, ae, text, spec = load_pipeline(args.checkpoint, preset=args.preset, use_ema=args.use_ema,
                                          device=args.device, **overrides)
    prompts = prompts or [spec.default_prompt]
    h, w = spec.latent_size
    latent_frames = ae.latent_frames(args.num_frames)
    prefix = None
    if args.init_video:
        prefix = to_float_video(read_video(args.init_video))[None]
    window = args.window_frames
    if window is None and spec.sampler == "few-step" and spec.training_frames:
        window = ae.latent_frames(spec.training_frames)  # Self Forcing streams through a window of its training length
    window = window or None  # 0: the whole video in the cache
    gen = StreamingGenerator(model, ae, text, (h, w), steps=spec.warped_steps().tolist(),
                             window_frames=window, sink_frames=args.sink_frames,
                             max_frames=latent_frames + 64, negative_prompt=spec.negative_prompt)
    for i, prompt in enumerate(prompts):
        out = args.out if len(prompts) == 1 else f"{os.path.splitext(args.out)[0]}_{i}.mp4"
        t0 = time.perf_counter()
        if spec.sampler == "few-step":
            chunks = list(gen.stream(prompt, latent_frames, seed=args.seed + i, switches=switches, prefix_video=prefix))
            frames = torch.cat([c.frames for c in chunks])
            first_latency = chunks[0].seconds
        else:
            frames = sample_many_step(model, ae, text, spec, prompt, latent_frames, seed=args.seed + i,
                                      window_frames=args.window_frames or None, sink_frames=args.sink_frames)
            first_latency = time.perf_counter() - t0  # not streamed: the whole clip arrives at once
            chunks = [None]
        seconds = time.perf_counter() - t0
        frames = frames[: args.num_frames]
        write_mp4(out, frames, fps=spec.fps)
        if args.sheet and i == 0:
            every = max(1, -(-len(frames) // 32))  # at most 32 tiles, labelled with their frame index
            write_contact_sheet(args.sheet, frames[::every], labels=[str(i) for i in range(0, len(frames), every)])
        report = {"path": out, "prompt": prompt, "frames": int(frames.shape[0]), "seconds": round(seconds, 3),
                  "fps": round(frames.shape[0] / seconds, 2), "first_chunk_latency_s": round(first_latency, 4),
                  "chunks": len(chunks), "sampler": spec.sampler, "window_frames": window}
        print(json.dumps(report) if args.json else f"{out}: {report['frames']} frames in {seconds:.2f} s "
              f"({report['fps']} fps, first chunk {report['first_chunk_latency_s']} s)")
    return 0
