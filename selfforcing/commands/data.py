"""`selfforcing data sample ...` (write a Moving-Digits clip) and `selfforcing data encode ...` (fill a store)."""

from __future__ import annotations

import argparse
import json


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="moving-digits", choices=["moving-digits"])
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-digits", default="1,2", help="range of digits per clip, e.g. 1,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=0, help="clip index within the split")
    p.add_argument("--out", required=True, help="mp4 file to write")
    p.add_argument("--gif", default=None, help="also write a GIF here")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet here")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _sample_run(args: argparse.Namespace) -> int:
    from selfforcing.data.moving_digits import render_clip
    from selfforcing.io import write_contact_sheet, write_gif, write_mp4

    lo, hi = (int(v) for v in args.num_digits.split(","))
    clip = render_clip(args.split, args.index, num_frames=args.num_frames, size=args.size, num_digits=(lo, hi),
                       seed=args.seed)
    write_mp4(args.out, clip["video"], fps=args.fps)
    if args.gif:
        write_gif(args.gif, clip["video"], fps=args.fps)
    if args.sheet:
        write_contact_sheet(args.sheet, clip["video"])
    if args.json:
        print(json.dumps({"caption": clip["caption"], "frames": args.num_frames, "path": args.out,
                          "labels": clip["labels"].tolist(), "directions": clip["directions"]}))
    else:
        print(clip["caption"])
    return 0


SUBCOMMANDS = {
    "sample": ("write a Moving-Digits clip (mp4, optional GIF / contact sheet) and print its caption",
               _sample_args, _sample_run),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (help_text, add, _) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.data_command][2](args)
