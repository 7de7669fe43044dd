"""`selfforcing data ...`: one module, several subcommands (listed in ``SUBCOMMANDS`` at the bottom).

* ``sample``: write a Moving-Digits clip (mp4, optional GIF / PNG contact sheet) and print its caption;
* ``encode``: encode clips (Moving-Digits or a video folder) into a store of latents + text states;
* ``ode-pairs``: sample teacher ODE trajectories and store their states at the few-step timesteps.

A new subcommand is a pair ``_<name>_args(parser)`` / ``_<name>_run(args) -> int`` plus one row in ``SUBCOMMANDS``.
The jobs themselves are library functions (:mod:`selfforcing.data.prepare`).
"""

from __future__ import annotations

import argparse
import json

import torch

from selfforcing.commands.argtypes import int_at_least, positive_float, range_of
from selfforcing.data.moving_digits import START_POSITIONS, render_clip
from selfforcing.data.prepare import (
    encode_clips,
    moving_digits_clips,
    training_captions,
    video_folder_clips,
    write_ode_pairs,
)
from selfforcing.data.prompts import read_prompt_file
from selfforcing.errors import UsageError
from selfforcing.io import write_contact_sheet, write_gif, write_mp4
from selfforcing.text import build_text_encoder


def _start_arg(p: argparse.ArgumentParser) -> None:
    """--start: where a Moving-Digits digit starts (``render_clip``'s ``start``)."""
    p.add_argument("--start", default="uniform", choices=START_POSITIONS,
                   help="where a digit starts: anywhere, or behind its motion (the motion shows all clip long)")


# ---------------------------------------------------------------------------------------------- sample
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="moving-digits", choices=["moving-digits"])
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="test: held-out digit images and held-out (digit, direction) captions")
    p.add_argument("--num-frames", type=int_at_least(1), default=16)
    p.add_argument("--size", type=int_at_least(29), default=64, help="canvas side in pixels (> 28)")
    p.add_argument("--num-digits", type=range_of(int), default="1,2", help="digits per clip, LO,HI within 1..3")
    p.add_argument("--speed", type=range_of(float), default="1,3", help="speed range, pixels per frame (LO,HI)")
    p.add_argument("--images-per-digit", type=int_at_least(1), default=None,
                   help="draw each digit class from its first K MNIST images (1: ten fixed glyphs; default: all)")
    _start_arg(p)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--index", type=int_at_least(0), default=0, help="clip index within the split")
    p.add_argument("--out", required=True, help="mp4 file to write")
    p.add_argument("--gif", default=None, help="also write a GIF here")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet here (frame indices labelled)")
    p.add_argument("--fps", type=positive_float, default=8.0)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"caption", "frames", "path", "labels", "directions", ...}')


def _sample_run(args: argparse.Namespace) -> int:
    clip = render_clip(args.split, args.index, num_frames=args.num_frames, size=args.size,
                       num_digits=args.num_digits, speed=args.speed, seed=args.seed,
                       images_per_digit=args.images_per_digit,
                       start=args.start)  # impossible settings: a ValueError naming them
    write_mp4(args.out, clip["video"], fps=args.fps)
    if args.gif:
        write_gif(args.gif, clip["video"], fps=args.fps)
    if args.sheet:
        write_contact_sheet(args.sheet, clip["video"], labels=True)
    if args.json:
        print(json.dumps({"caption": clip["caption"], "frames": args.num_frames, "path": args.out,
                          "labels": clip["labels"].tolist(), "directions": clip["directions"],
                          "velocities": clip["velocities"].tolist(), "split": args.split, "index": args.index,
                          "seed": args.seed, "gif": args.gif, "sheet": args.sheet}))
    else:
        print(clip["caption"])
    return 0


# ---------------------------------------------------------------------------------------------- encode / ode-pairs
def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="moving-digits", choices=["moving-digits", "video-folder"])
    p.add_argument("--path", default=None, help="video folder (for --dataset video-folder)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--num-clips", type=int, default=1000, help="Moving-Digits clips to encode")
    p.add_argument("--num-frames", type=int, default=12, help="pixel frames per clip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-digits", default="1,2")
    p.add_argument("--images-per-digit", type=int_at_least(1), default=None,
                   help="draw each digit class from its first K MNIST images (default: all)")
    _start_arg(p)
    p.add_argument("--stride", type=int, default=1, help="frame stride (video folders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder", default="moving-digits")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")


def _encode_run(args: argparse.Namespace) -> int:
    if args.dataset == "moving-digits":
        lo, hi = (int(v) for v in args.num_digits.split(","))
        source = moving_digits_clips(args.split, args.num_clips, num_frames=args.num_frames, size=args.size,
                                     num_digits=(lo, hi), seed=args.seed, images_per_digit=args.images_per_digit,
                                     start=args.start)
    else:
        if not args.path:
            raise UsageError("--dataset video-folder needs --path FOLDER")
        source = video_folder_clips(args.path, num_frames=args.num_frames, size=args.size, stride=args.stride)
    summary = encode_clips(args.out, source, autoencoder=args.autoencoder, text_encoder=args.text_encoder,
                           text_len=args.text_len, negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    print(json.dumps(summary))
    return 0


def _ode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint (save_pretrained dir or training checkpoint)")
    p.add_argument("--preset", default="tiny", help="architecture of a checkpoint file")
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--prompts", default=None, help="prompt file (default: Moving-Digits training captions)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--num-digits", type=range_of(int), default="1,2",
                   help="digits per training caption when prompts come from Moving-Digits (LO,HI within 1..3)")
    p.add_argument("--latent-shape", default="12,8,16,16", help="F,C,H,W of the generated latents")
    p.add_argument("--steps", type=int, default=48, help="Euler steps (a multiple of the few-step list length)")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--denoising-steps", default="1000,750,500,250")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True)


def _ode_run(args: argparse.Namespace) -> int:
    from selfforcing.models import CausalWanModel  # here: the models add seconds to every `data` command

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = CausalWanModel.from_checkpoint(args.teacher, preset=args.preset, use_ema=args.use_ema).eval().to(device)
    text = build_text_encoder(args.text_encoder, args.text_len, device=device)
    if args.prompts:
        prompts = read_prompt_file(args.prompts)[: args.num_prompts]
    else:
        prompts = training_captions(args.num_prompts, num_digits=args.num_digits, seed=args.seed)
    summary = write_ode_pairs(args.out, teacher, text, prompts,
                              latent_shape=[int(v) for v in args.latent_shape.split(",")], num_steps=args.steps,
                              shift=args.shift, guidance_scale=args.guidance_scale,
                              denoising_steps=[float(v) for v in args.denoising_steps.split(",")],
                              negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.batch_size,
                              teacher_name=args.teacher)
    print(json.dumps(summary))
    return 0


SUBCOMMANDS = {
    "sample": ("write a Moving-Digits clip (mp4, optional GIF / contact sheet) and print its caption",
               _sample_args, _sample_run),
    "encode": ("encode clips (Moving-Digits or a video folder) into a store of latents + text states",
               _encode_args, _encode_run),
    "ode-pairs": ("sample teacher ODE trajectories with CFG and store their states at the few-step timesteps",
                  _ode_args, _ode_run),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subparser per row of ``SUBCOMMANDS``; the chosen name lands in ``args.data_command``."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (help_text, add, _) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; returns its exit status."""
    return SUBCOMMANDS[args.data_command][2](args)
