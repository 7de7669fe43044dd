"""`selfforcing presets` and `selfforcing demo`."""

from __future__ import annotations

import argparse
import json

from selfforcing.errors import UsageError
from selfforcing.fileio import check_writable


# ---------------------------------------------------------------------------------------------- presets
def presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def presets_run(args: argparse.Namespace) -> int:
    import torch

    from selfforcing.models import PRESETS, CausalWanModel

    rows = []
    for name in PRESETS:
        with torch.device("meta"):
            model = CausalWanModel.from_preset(name)
        c = model.config
        rows.append(dict(
            name=name,
            parameters=sum(p.numel() for p in model.parameters()),
            dim=model.dim,
            layers=c.num_layers,
            heads=c.num_attention_heads,
            ffn_dim=c.ffn_dim,
            in_channels=c.in_channels,
            text_dim=c.text_dim,
            num_frame_per_block=c.num_frame_per_block,
        ))
    if args.json:
        print(json.dumps({"presets": rows}))
    else:
        print(f"{'preset':<18}{'params':>16}{'dim':>6}{'layers':>8}{'heads':>7}{'ffn':>7}{'C':>4}{'text':>6}")
        for r in rows:
            print(f"{r['name']:<18}{r['parameters']:>16,}{r['dim']:>6}{r['layers']:>8}{r['heads']:>7}"
                  f"{r['ffn_dim']:>7}{r['in_channels']:>4}{r['text_dim']:>6}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="generator (default: the shipped Moving-Digits model)")
    p.add_argument("--prompt", default=None, help="default: the model's default prompt")
    p.add_argument("--num-frames", type=int, default=96, help="pixel frames (default 96: 8x the training clip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo.mp4", help="mp4 to write (default demo.mp4)")
    p.add_argument("--sheet", default="demo.png", help="PNG contact sheet to write (default demo.png)")


def demo_run(args: argparse.Namespace) -> int:
    """Stream a video from the shipped model (Algorithm 2 with a rolling KV cache), write the mp4 and a PNG contact
    sheet, and report frames per second and the first chunk's latency: ``selfforcing generate`` with defaults."""
    # the library loads here, not at the top: torch and the models take seconds to import, `--help` should not
    from selfforcing.data.prompts import require_prompt
    from selfforcing.generate import streaming_generator, streaming_window, write_video
    from selfforcing.pipeline import load_pipeline

    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    prompt = require_prompt(args.prompt, "--prompt") if args.prompt else None
    for path in (args.out, args.sheet):
        check_writable(path)  # before any compute
    model, ae, text, spec = load_pipeline(args.checkpoint)
    window = streaming_window(spec, ae, None)  # the model's training length, as the server streams
    gen = streaming_generator(model, ae, text, spec, latent_frames=ae.latent_frames(args.num_frames),
                              window_frames=window)
    report = write_video(args.out, gen, spec, prompt or spec.default_prompt, num_frames=args.num_frames,
                         seed=args.seed, sheet=args.sheet)
    report = {**report, "window_frames": window, "unconditional": False}
    print(f"selfforcing demo: \"{report['prompt']}\" -> {report['path']} ({report['frames']} frames) and "
          f"{args.sheet}\n  {report['fps']} frames/s, first chunk after {report['first_chunk_latency_s']} s, "
          f"{report['seconds']} s in all ({report['chunks']} chunks)")
    print(json.dumps(report))
    return 0
