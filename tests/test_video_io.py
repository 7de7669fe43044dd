"""mp4 / GIF / PNG out and mp4 in (PyAV, Pillow), and the `data sample` command."""

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from selfforcing.cli import main
from selfforcing.data.moving_digits import parse_caption, render_clip
from selfforcing.io import read_video, to_float_video, to_uint8_frames, write_contact_sheet, write_gif, write_mp4
from selfforcing.io.video import gif_frame_durations


def gif_play_time_ms(path) -> int:
    """Sum of the frame durations of a GIF (Pillow merges identical consecutive frames, adding their durations)."""
    with Image.open(path) as gif:
        total = 0
        for i in range(gif.n_frames):
            gif.seek(i)
            total += gif.info["duration"]
    return total


def test_uint8_float_converters_are_inverse():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    video = to_float_video(frames)
    assert video.shape == (3, 3, 5, 7) and video.dtype == torch.float32
    assert float(video.min()) >= -1 and float(video.max()) <= 1
    assert torch.equal(video[1, 2, 4, 6], torch.tensor(frames[1, 4, 6, 2] / 127.5 - 1, dtype=torch.float32))
    assert np.array_equal(to_uint8_frames(video), frames)
    assert np.array_equal(to_uint8_frames(torch.from_numpy(frames)), frames)  # uint8 tensors pass through
    grey = to_uint8_frames(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5))
    assert grey.shape == (1, 1, 5, 3) and grey[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # clamped, rounded


def test_mp4_round_trip_is_close(tmp_path):
    clip = render_clip("train", 1, num_frames=12, num_digits=(2, 2))
    path = write_mp4(tmp_path / "sub" / "dir" / "a.mp4", clip["video"], fps=8)  # parent folders created
    frames = read_video(path)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    err = np.abs(frames.astype(np.float32) - to_uint8_frames(clip["video"]).astype(np.float32)).mean()
    assert err < 2  # H.264 at crf 18 on a smooth clip: well under the 8/255 the issue allows
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8
    assert sorted(os.listdir(tmp_path / "sub" / "dir")) == ["a.mp4"]  # no temp file left behind
    # uint8 [F, H, W, 3] input is written as it is
    again = read_video(write_mp4(tmp_path / "b.mp4", frames, fps=12.5))
    assert again.shape == frames.shape and np.abs(again.astype(int) - frames.astype(int)).mean() < 2


def test_odd_sizes_gif_and_sheet(tmp_path):
    video = torch.rand(5, 3, 33, 47, generator=torch.Generator().manual_seed(0)) * 2 - 1
    frames = read_video(write_mp4(tmp_path / "odd.mp4", video))
    assert frames.shape == (5, 34, 48, 3)  # padded to even for yuv420p
    gif = Image.open(write_gif(tmp_path / "a.gif", video, fps=4))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (47, 33)
    assert gif_play_time_ms(gif.filename) == 1250
    sheet = Image.open(write_contact_sheet(tmp_path / "s.png", video, columns=3))
    assert sheet.format == "PNG" and sheet.size == (3 * 49 + 2, 2 * 35 + 2)
    # frame 4 sits in row 1, column 1 of the grid (its top rows hold the label "4")
    np.testing.assert_array_equal(np.asarray(sheet)[2 + 35 + 16:2 + 35 + 33, 2 + 49:2 + 49 + 47],
                                  to_uint8_frames(video)[4, 16:])


def test_gif_timing_keeps_the_play_time():
    eight_fps = gif_frame_durations(4, 8)  # 125 ms is not a whole number of centiseconds: alternate 120 / 130
    assert sorted(eight_fps) == [120, 120, 130, 130] and sum(eight_fps) == 500
    for frames, fps in ((20, 8), (31, 30), (7, 12.5), (100, 24)):
        durations = gif_frame_durations(frames, fps)
        assert len(durations) == frames and all(d % 10 == 0 for d in durations)
        assert abs(sum(durations) - 1000 * frames / fps) <= 10
    assert gif_frame_durations(3, 120) == [20, 20, 20]  # players slow down frames under 20 ms anyway


def test_contact_sheet_labels(tmp_path):
    video = -torch.ones(4, 3, 24, 24)  # black frames: any label pixel shows
    plain = np.asarray(Image.open(write_contact_sheet(tmp_path / "plain.png", video, columns=4, labels=None)))
    indexed = np.asarray(Image.open(write_contact_sheet(tmp_path / "idx.png", video, columns=4, labels=True)))
    named = np.asarray(Image.open(write_contact_sheet(tmp_path / "n.png", video, columns=4,
                                                      labels=["a", "b", "c", "d"])))
    assert plain.shape == indexed.shape == (28, 4 * 26 + 2, 3)
    assert plain[2:26, 2:26].max() == 0 and indexed[2:26, 2:26].max() > 0  # a label drawn on frame 0
    assert not np.array_equal(indexed, named)
    with pytest.raises(ValueError, match="one label per frame"):
        write_contact_sheet(tmp_path / "bad.png", video, labels=["a"])


def test_bad_video_input(tmp_path):
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        to_uint8_frames(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        to_uint8_frames(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="no pixels"):
        write_mp4(tmp_path / "empty.mp4", torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="fps"):
        write_gif(tmp_path / "x.gif", torch.zeros(2, 3, 8, 8), fps=0)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 10)
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad)
    # a failed write leaves an existing file as it was
    good = write_mp4(tmp_path / "keep.mp4", torch.zeros(2, 3, 8, 8))
    before = open(good, "rb").read()
    with pytest.raises(ValueError):
        write_mp4(good, torch.full((2, 3, 8, 8), float("inf")))
    assert open(good, "rb").read() == before


def test_data_sample_writes_a_clip_and_prints_its_caption(tmp_path, capsys):
    out, gif, sheet = tmp_path / "x.mp4", tmp_path / "x.gif", tmp_path / "x.png"
    assert main(["data", "sample", "--dataset", "moving-digits", "--num-frames", "20", "--seed", "4", "--index", "2",
                 "--out", str(out), "--gif", str(gif), "--sheet", str(sheet), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    clip = render_clip("train", 2, num_frames=20, seed=4)
    assert info["caption"] == clip["caption"] and info["labels"] == clip["labels"].tolist()
    assert info["frames"] == 20 and info["path"] == str(out)
    assert [d for d, _ in parse_caption(info["caption"])] == info["labels"]
    frames = read_video(out)
    assert frames.shape == (20, 64, 64, 3)
    assert np.abs(frames.astype(np.float32) - to_uint8_frames(clip["video"])).mean() < 2
    assert Image.open(gif).size == (64, 64) and gif_play_time_ms(gif) == 20 * 125
    assert Image.open(sheet).size == (8 * 66 + 2, 3 * 66 + 2)
    # plain output: just the caption; a test-split clip, another size
    assert main(["data", "sample", "--split", "test", "--size", "48", "--num-frames", "3", "--num-digits", "1",
                 "--out", str(tmp_path / "t.mp4")]) == 0
    expected = render_clip("test", 0, num_frames=3, size=48, num_digits=(1, 1))["caption"]
    assert capsys.readouterr().out.strip() == expected
    assert read_video(tmp_path / "t.mp4").shape == (3, 48, 48, 3)


@pytest.mark.parametrize("bad", [["--num-frames", "0"], ["--num-digits", "two"], ["--num-digits", "3,1"],
                                 ["--size", "20"], ["--fps", "-1"], ["--split", "val"], ["--index", "-3"]])
def test_data_sample_rejects_bad_arguments(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as err:
        main(["data", "sample", "--out", str(tmp_path / "x.mp4"), *bad])
    assert err.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_data_sample_reports_impossible_settings(tmp_path, capsys):
    assert main(["data", "sample", "--num-digits", "1,4", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfforcing data: ") and "num_digits" in err
    assert not (tmp_path / "x.mp4").exists()
