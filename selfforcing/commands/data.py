"""`selfforcing data ...`: one module, several subcommands (listed in ``SUBCOMMANDS`` at the bottom).

* ``sample``: write a Moving-Digits clip (mp4, optional GIF / PNG contact sheet) and print its caption;
* ``encode``: encode clips (Moving-Digits or a video folder) into a store of latents + text states;
* ``ode-pairs``: sample teacher ODE trajectories and store their states at the few-step timesteps.

A new subcommand is a pair ``_<name>_args(parser)`` / ``_<name>_run(args) -> int`` plus one row in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json

from selfforcing.errors import UsageError


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def range_of(kind):
    """argparse type: "LO,HI" (or one value, meaning LO = HI) -> (LO, HI) of ``kind``, LO <= HI."""
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LO,HI ({kind.__name__}s), got {text!r}") from None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or values[0] > values[1]:
            raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, got {text!r}")
        return tuple(values)
    return parse


def _start_arg(p: argparse.ArgumentParser) -> None:
    """--start: where a Moving-Digits digit starts (``render_clip``'s ``start``)."""
    from selfforcing.data.moving_digits import START_POSITIONS

    p.add_argument("--start", default="uniform", choices=START_POSITIONS,
                   help="where a digit starts: anywhere, or behind its motion (the motion shows all clip long)")


# ---------------------------------------------------------------------------------------------- sample
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="moving-digits", choices=["moving-digits"])
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="test: held-out digit images and held-out (digit, direction) captions")
    p.add_argument("--num-frames", type=_int_at_least(1), default=16)
    p.add_argument("--size", type=_int_at_least(29), default=64, help="canvas side in pixels (> 28)")
    p.add_argument("--num-digits", type=range_of(int), default="1,2", help="digits per clip, LO,HI within 1..3")
    p.add_argument("--speed", type=range_of(float), default="1,3", help="speed range, pixels per frame (LO,HI)")
    p.add_argument("--images-per-digit", type=_int_at_least(1), default=None,
                   help="draw each digit class from its first K MNIST images (1: ten fixed glyphs; default: all)")
    _start_arg(p)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--index", type=_int_at_least(0), default=0, help="clip index within the split")
    p.add_argument("--out", required=True, help="mp4 file to write")
    p.add_argument("--gif", default=None, help="also write a GIF here")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet here (frame indices labelled)")
    p.add_argument("--fps", type=_positive_float, default=8.0)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"caption", "frames", "path", "labels", "directions", ...}')


def _sample_run(args: argparse.Namespace) -> int:
    from selfforcing.data.moving_digits import render_clip
    from selfforcing.io import write_contact_sheet, write_gif, write_mp4

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
class Skipped:
    """What ``make_records`` returns for an item it could not read: ``kind`` is the summary key (e.g.
    decode_failed); the warning naming the file has been given already."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


def fill_store(out: str, attrs: dict, keys: list[str], make_records, batch_size: int, null_context,
               desc: str) -> tuple[int, dict[str, int]]:
    """Write ``make_records(batch_keys) -> [(tensors, metadata) or Skipped]`` for every key not yet in the store at
    ``out`` (resumable: a killed job continues where it stopped), plus the unconditional text states in
    ``out/null_context.pt``. Returns (records written now, {skip kind: count} of the items left out now)."""
    import os

    import torch
    from tqdm import tqdm

    from selfforcing.data.store import StoreWriter
    from selfforcing.fileio import atomic_write

    written, skipped = 0, {}
    with StoreWriter(out, resume=os.path.isdir(out), attrs=attrs) as writer:
        todo = [k for k in keys if k not in writer]
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo):
            batch = todo[start:start + batch_size]
            for key, record in zip(batch, make_records(batch)):
                if isinstance(record, Skipped):
                    skipped[record.kind] = skipped.get(record.kind, 0) + 1
                    continue
                tensors, meta = record
                writer.add(tensors, meta, key=key)
                written += 1
    atomic_write(os.path.join(out, "null_context.pt"), lambda tmp: torch.save(null_context.cpu().contiguous(), tmp))
    return written, skipped


def _summary(out: str, written: int, skipped: dict[str, int], total: int) -> str:
    """The JSON line of a store job: records written now, items left out by kind, items already in the store
    before, and the total (written + skipped + existing)."""
    existing = total - written - sum(skipped.values())
    return json.dumps({"store": out, "written": written, "skipped": dict(sorted(skipped.items())),
                       "existing": existing, "total": total})


def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="moving-digits", choices=["moving-digits", "video-folder"])
    p.add_argument("--path", default=None, help="video folder (for --dataset video-folder)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--num-clips", type=int, default=1000, help="Moving-Digits clips to encode")
    p.add_argument("--num-frames", type=int, default=12, help="pixel frames per clip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-digits", default="1,2")
    p.add_argument("--images-per-digit", type=_int_at_least(1), default=None,
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
    import torch

    from selfforcing.autoencoders import get_autoencoder
    from selfforcing.text import build_text_encoder

    ae = get_autoencoder(args.autoencoder)
    text = build_text_encoder(args.text_encoder, args.text_len)
    if args.dataset == "moving-digits":
        from selfforcing.data.moving_digits import render_clip

        lo, hi = (int(v) for v in args.num_digits.split(","))
        keys = [f"moving-digits/{args.split}/{i}" for i in range(args.num_clips)]

        def load(key):
            return render_clip(args.split, int(key.rsplit("/", 1)[1]), num_frames=args.num_frames, size=args.size,
                               num_digits=(lo, hi), seed=args.seed, images_per_digit=args.images_per_digit,
                               start=args.start)
    else:
        from collections import Counter

        from selfforcing.data.video_folder import VideoDecodeError, VideoFolderDataset, skip_kind

        if not args.path:
            raise UsageError("--dataset video-folder needs --path FOLDER")
        ds = VideoFolderDataset(args.path, args.num_frames, args.size, stride=args.stride)
        keys = [f"video/{i}" for i in range(len(ds))]
        probe_skips = dict(Counter(ds.skip_kinds.values()))  # files left out when the folder was probed

        def load(key):
            """The clip of one file, or Skipped when it fails at any point while being read (never another clip
            in its place)."""
            i = int(key.rsplit("/", 1)[1])
            try:
                return {"video": ds.load(i), "caption": ds.videos[i].caption}
            except VideoDecodeError as err:
                ds.skip(i, err)
                return Skipped(skip_kind(err))

    @torch.no_grad()
    def make_records(batch_keys):
        items = [load(k) for k in batch_keys]
        good = [it for it in items if not isinstance(it, Skipped)]
        if not good:
            return items
        latents = iter(ae.encode(torch.stack([it["video"] for it in good])))
        states = iter(text.encode([it["caption"] for it in good]).states)
        return [it if isinstance(it, Skipped) else ({"latents": next(latents), "context": next(states)},
                                                    {"caption": it["caption"]}) for it in items]

    attrs = {"dataset": args.dataset, "autoencoder": args.autoencoder, "text_encoder": text.identity,
             "num_frames": args.num_frames, "size": args.size}
    if args.dataset == "moving-digits":
        attrs.update(num_digits=args.num_digits, images_per_digit=args.images_per_digit, start=args.start)
    n, skipped = fill_store(args.out, attrs, keys, make_records, args.batch_size,
                            text.encode([args.negative_prompt]).states[0], "encode")
    total = len(keys)
    if args.dataset == "video-folder":  # the files the probe left out count too
        for kind, count in probe_skips.items():
            skipped[kind] = skipped.get(kind, 0) + count
        total += sum(probe_skips.values())
    print(_summary(args.out, n, skipped, total))
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
    import torch

    from selfforcing import flow
    from selfforcing.models import CausalWanModel
    from selfforcing.sampling import sample_bidirectional
    from selfforcing.text import build_text_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = CausalWanModel.from_checkpoint(args.teacher, preset=args.preset, use_ema=args.use_ema).eval().to(device)
    text = build_text_encoder(args.text_encoder, args.text_len, device=device)
    if args.prompts:
        from selfforcing.data.prompts import read_prompt_file

        prompts = read_prompt_file(args.prompts)[: args.num_prompts]
    else:
        from selfforcing.data.moving_digits import render_clip

        prompts = [render_clip("train", i, num_frames=1, num_digits=args.num_digits, seed=args.seed)["caption"]
                   for i in range(args.num_prompts)]
    shape = tuple(int(v) for v in args.latent_shape.split(","))
    few = flow.denoising_step_list([float(v) for v in args.denoising_steps.split(",")], shift=args.shift)
    null = text.encode([args.negative_prompt]).states
    keys = [f"ode/{i}" for i in range(len(prompts))]

    @torch.no_grad()
    def make_records(batch_keys):
        idx = [int(k.rsplit("/", 1)[1]) for k in batch_keys]
        ctx = text.encode([prompts[i] for i in idx]).states
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))
                             for i in idx]).to(device)
        _, states = sample_bidirectional(teacher, noise, ctx, null_context=null.expand(len(idx), -1, -1),
                                         num_steps=args.steps, shift=args.shift, guidance_scale=args.guidance_scale,
                                         record_timesteps=few)
        return [({"ode_states": s.cpu(), "context": c.cpu()}, {"prompt": prompts[i]})
                for s, c, i in zip(states, ctx, idx)]

    attrs = {"teacher": args.teacher, "steps": args.steps, "shift": args.shift, "guidance_scale": args.guidance_scale,
             "few_step_timesteps": few.tolist(), "latent_shape": list(shape), "text_encoder": text.identity}
    n, skipped = fill_store(args.out, attrs, keys, make_records, args.batch_size, null[0].cpu(), "ode pairs")
    print(_summary(args.out, n, skipped, len(keys)))
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
