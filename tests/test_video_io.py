"""mp4 / GIF / PNG out, and the `selfforcing data sample` command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfforcing.cli import main
from selfforcing.data.moving_digits import render_clip
from selfforcing.data.prompts import read_prompt_file, write_prompt_file
from selfforcing.io import read_video, to_float_video, to_uint8_frames, write_contact_sheet, write_gif, write_mp4


def test_mp4_round_trip_is_close(tmp_path):
    clip = render_clip("train", 1, num_frames=12)
    path = write_mp4(tmp_path / "a.mp4", clip["video"], fps=8)
    frames = read_video(path)
    assert frames.shape == (12, 64, 64, 3)
    err = np.abs(frames.astype(np.float32) - to_uint8_frames(clip["video"]).astype(np.float32)).mean()
    assert err < 8  # H.264 at crf 18 on 0..255 pixels
    back = to_float_video(frames)
    assert back.shape == (12, 3, 64, 64) and float(back.min()) >= -1 and float(back.max()) <= 1


def test_odd_sizes_gif_and_sheet(tmp_path):
    video = torch.rand(5, 3, 33, 47) * 2 - 1
    frames = read_video(write_mp4(tmp_path / "odd.mp4", video))
    assert frames.shape == (5, 34, 48, 3)  # padded to even for yuv420p
    gif = Image.open(write_gif(tmp_path / "a.gif", video))
    assert gif.n_frames == 5 and gif.size == (47, 33)
    sheet = Image.open(write_contact_sheet(tmp_path / "s.png", video, columns=3))
    assert sheet.size == (3 * 49 + 2, 2 * 35 + 2)


def test_bad_video_input(tmp_path):
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        to_uint8_frames(torch.zeros(3, 4, 4))
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 10)
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad)


def test_data_sample_cli(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert main(["data", "sample", "--dataset", "moving-digits", "--num-frames", "20", "--seed", "4", "--out", str(out),
                 "--sheet", str(tmp_path / "x.png"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == 20 and info["caption"].startswith("the digit")
    assert read_video(out).shape[0] == 20
    assert info["caption"] == render_clip("train", 0, num_frames=20, seed=4)["caption"]


def test_prompt_files(tmp_path):
    p = write_prompt_file(tmp_path / "p.txt", ["the digit 3 moves right", "une vidéo  "])
    (tmp_path / "q.txt").write_text("\n  first  \n\n second\n", encoding="utf-8")
    assert read_prompt_file(p) == ["the digit 3 moves right", "une vidéo"]
    assert read_prompt_file(tmp_path / "q.txt") == ["first", "second"]
    (tmp_path / "bad.txt").write_bytes(b"good line\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not valid UTF-8"):
        read_prompt_file(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")

