"""Data: Moving-Digits, video folders, prompt files and the store of precomputed records."""

from .moving_digits import (
    MovingDigits,
    caption_for,
    collate_clips,
    held_out_captions,
    load_mnist_digits,
    parse_caption,
    render_clip,
)
from .prompts import read_prompt_file, write_prompt_file

__all__ = ["MovingDigits", "caption_for", "collate_clips", "held_out_captions", "load_mnist_digits", "parse_caption",
           "render_clip", "read_prompt_file", "write_prompt_file"]
