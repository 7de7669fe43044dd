"""Autoencoders: one interface, streaming decode == full decode, the shipped Moving-Digits AE, the Wan VAE."""

import json
import os
import shutil

import pytest
import torch

from selfforcing.autoencoders import (
    IdentityAutoencoder,
    VideoAEConfig,
    VideoAutoencoder,
    WanVAE,
    get_autoencoder,
)
from selfforcing.autoencoders.train import (
    AETrainConfig,
    clip_psnr,
    evaluate_reconstruction,
    held_out_clips,
    near_digit_mask,
    train_autoencoder,
)
from selfforcing.config import ConfigError, build_config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "autoencoder", "moving_digits.yaml")
TINY_WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.2])


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan_vae")
    AutoencoderKLWan(**TINY_WAN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_wan(tiny_wan_dir):
    return get_autoencoder(tiny_wan_dir)


@pytest.fixture(scope="module")
def random_small_ae():
    torch.manual_seed(0)
    return VideoAutoencoder(VideoAEConfig()).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shipped():
    return get_autoencoder("moving-digits")


@pytest.fixture(scope="module")
def test_clips():
    return held_out_clips(AETrainConfig().data, 4)  # the first 4 held-out clips, [4, 16, 3, 64, 64]


# ---------------------------------------------------------------------------------------------- streaming
def _stream(ae, latents, chunks):
    decoder = ae.stream_decoder(latents.shape[0])
    out, start = [], 0
    for n in chunks:
        out.append(decoder.decode_chunk(latents[:, start:start + n]))
        start += n
    assert start == latents.shape[1]
    return out


@pytest.mark.parametrize("kind", ["identity", "small-ae", "wan"])
def test_stream_decode_equals_full_decode(kind, random_small_ae, tiny_wan):
    torch.manual_seed(1)
    if kind == "identity":
        ae, latents, chunks = IdentityAutoencoder(), 1.3 * torch.randn(2, 6, 3, 8, 8), [1, 3, 2]
    elif kind == "small-ae":
        ae, latents, chunks = random_small_ae, torch.randn(2, 6, 8, 16, 16), [1, 3, 2]
    else:
        ae, latents, chunks = tiny_wan, torch.randn(2, 4, 4, 8, 8), [1, 2, 1]
    with torch.no_grad():
        full = ae.decode(latents)
        parts = _stream(ae, latents, chunks)
    s = ae.spatial_compression
    assert full.shape == (2, ae.pixel_frames(latents.shape[1]), 3, latents.shape[3] * s, latents.shape[4] * s)
    # first chunk gives 1 + T (f - 1) pixel frames, later chunks T f
    t = ae.temporal_compression
    assert [p.shape[1] for p in parts] == [1 + t * (chunks[0] - 1)] + [t * n for n in chunks[1:]]
    assert full.std() > 0.05 and full.min() >= -1 and full.max() <= 1
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_wan_stream_keeps_causal_cache_between_chunks(tiny_wan):
    """The second chunk's pixels depend on the first chunk (the cache), and reset() forgets it."""
    torch.manual_seed(2)
    z = torch.randn(1, 3, 4, 8, 8)
    other_first = torch.randn(1, 1, 4, 8, 8)
    decoder = tiny_wan.stream_decoder(1)
    with torch.no_grad():
        decoder.decode_chunk(z[:, :1])
        second = decoder.decode_chunk(z[:, 1:])
        decoder.reset()
        decoder.decode_chunk(other_first)
        second_other = decoder.decode_chunk(z[:, 1:])
        decoder.reset()
        assert decoder.frames_decoded == 0
        replay = torch.cat([decoder.decode_chunk(z[:, :1]), decoder.decode_chunk(z[:, 1:])], dim=1)
    assert (second - second_other).abs().max() > 1e-3
    torch.testing.assert_close(replay[:, 1:], second, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- Wan VAE
def test_wan_vae_matches_diffusers_with_wan_normalisation(tiny_wan, tiny_wan_dir):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan.from_pretrained(tiny_wan_dir).eval()
    assert isinstance(tiny_wan, WanVAE)
    assert (tiny_wan.latent_channels, tiny_wan.spatial_compression, tiny_wan.temporal_compression) == (4, 4, 4)
    assert tiny_wan.latent_frames(9) == 3 and tiny_wan.pixel_frames(3) == 9
    torch.manual_seed(3)
    video = torch.rand(2, 9, 3, 32, 32) * 2 - 1
    mean = torch.tensor(TINY_WAN["latents_mean"]).view(1, 1, 4, 1, 1)
    std = torch.tensor(TINY_WAN["latents_std"]).view(1, 1, 4, 1, 1)
    with torch.no_grad():
        z = tiny_wan.encode(video)
        mu = ref.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)
        recon = tiny_wan.decode(z)
        ref_recon = ref.decode((z * std + mean).permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)
    assert z.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(z, (mu - mean) / std, atol=1e-5, rtol=1e-5)
    assert recon.shape == video.shape
    torch.testing.assert_close(recon, ref_recon, atol=1e-5, rtol=0)


def test_wan_pipeline_folder_with_vae_subfolder(tiny_wan_dir, tmp_path):
    shutil.copytree(tiny_wan_dir, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    assert isinstance(get_autoencoder(tmp_path), WanVAE)


# ---------------------------------------------------------------------------------------------- small AE
def test_small_ae_latent_shapes(random_small_ae):
    video = torch.rand(2, 5, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = random_small_ae.encode(video)
        assert z.shape == (2, 5, 8, 16, 16)
        assert random_small_ae.decode(z).shape == video.shape
    assert random_small_ae.latent_shape(16, 64, 64) == (16, 8, 16, 16)


def test_small_ae_is_frame_local(random_small_ae):
    """No temporal context: a frame's latent does not change when the other frames do."""
    torch.manual_seed(4)
    a = torch.rand(1, 3, 3, 64, 64) * 2 - 1
    b = a.clone()
    b[:, 1:] = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(random_small_ae.encode(a)[:, 0], random_small_ae.encode(b)[:, 0])


def test_save_load_round_trip(random_small_ae, tmp_path):
    random_small_ae.latent_mean.copy_(torch.linspace(-1, 1, 8))
    random_small_ae.latent_std.copy_(torch.linspace(0.5, 2, 8))
    try:
        random_small_ae.save_pretrained(tmp_path / "ae", extra={"note": "x"})
        assert sorted(os.listdir(tmp_path / "ae")) == ["config.json", "model.safetensors"]  # no temp files left
        loaded = get_autoencoder(tmp_path / "ae")
        video = torch.rand(1, 2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(video), random_small_ae.encode(video))
            torch.testing.assert_close(loaded(video), random_small_ae(video))
    finally:
        random_small_ae.latent_mean.zero_()
        random_small_ae.latent_std.fill_(1.0)


def test_shipped_small_ae_reconstructs_held_out_clips(shipped, random_small_ae, test_clips):
    assert (shipped.latent_channels, shipped.spatial_compression, shipped.temporal_compression) == (8, 4, 1)
    trained = evaluate_reconstruction(shipped, test_clips)
    untrained = evaluate_reconstruction(random_small_ae, test_clips)
    assert trained["psnr"] >= 30.0, trained
    assert trained["psnr_near_digits"] >= 25.0, trained
    assert untrained["psnr"] < 20.0, untrained  # the metric can fail: random weights are far worse
    assert trained["psnr_near_digits"] > untrained["psnr_near_digits"] + 10


def test_shipped_latents_are_roughly_unit_scale(shipped, test_clips):
    with torch.no_grad():
        z = shipped.encode(test_clips)  # [4, 16, 8, 16, 16]
    per_channel = z.transpose(1, 2).flatten(2)
    assert per_channel.mean(-1).abs().max() < 0.5
    assert 0.5 < per_channel.std(-1).mean() < 1.5


def test_psnr_and_near_digit_mask():
    video = -torch.ones(1, 1, 3, 16, 16)
    video[..., 8, 8] = 1.0
    mask = near_digit_mask(video, radius=2)
    assert mask.sum() == 25 and mask[0, 0, 0, 6:11, 6:11].all()
    noisy = video.clone()
    noisy[..., 0, 0] = 0.0  # an error far from the digit: whole-frame PSNR sees it, near-digit PSNR does not
    assert torch.isfinite(clip_psnr(video, noisy)) and clip_psnr(video, noisy) < 40
    assert clip_psnr(video, noisy, mask) > 100
    # error 0.2 on [-1, 1] everywhere = 0.1 on [0, 1] -> 20 dB
    torch.testing.assert_close(clip_psnr(video, video + 0.2), torch.tensor([20.0]))


# ---------------------------------------------------------------------------------------------- training
def test_training_is_deterministic_and_saves(tmp_path):
    overrides = ["steps=2", "batch_size=8", "frames_per_clip=4", "stats_clips=2", "eval_every=0",
                 "model.channels=[8, 8, 8]", "data.num_frames=4", "data.train_clips=16", "data.test_clips=2"]
    states = []
    for run in ("a", "b"):
        cfg = load_config(RECIPE, AETrainConfig, overrides=overrides + [f"out_dir={tmp_path / run}"])
        model, facts = train_autoencoder(cfg, progress=False)
        states.append(model.state_dict())
        meta = json.loads((tmp_path / run / "config.json").read_text())
        assert meta["held_out"]["clips"] == 2 and meta["steps"] == 2
        assert sorted(os.listdir(tmp_path / run)) == ["config.json", "model.safetensors"]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    assert not torch.equal(states[0]["latent_std"], torch.ones(8))  # the latent scale was measured


def test_recipe_loads_and_rejects_unknown_keys():
    cfg = load_config(RECIPE, AETrainConfig)
    assert cfg.model.latent_channels == 8 and 2 ** (len(cfg.model.channels) - 1) == 4
    with pytest.raises(ConfigError, match="unknown config key model.widths"):
        build_config(AETrainConfig, {"model": {"widths": [1]}})


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_channel_counts(random_small_ae):
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels .* got 1"):
        random_small_ae.encode(torch.zeros(1, 2, 1, 64, 64))
    with pytest.raises(ValueError, match="expects latents with 8 channels .* got 16"):
        random_small_ae.decode(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="expects latents with 8 channels .* got 4"):
        random_small_ae.stream_decoder(1).decode_chunk(torch.zeros(1, 1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"video must be \[B, F, 3, H, W\], got \[2, 3, 64, 64\]"):
        random_small_ae.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by its spatial compression 4, got 62x64"):
        random_small_ae.encode(torch.zeros(1, 1, 3, 62, 64))


def test_stream_decoder_rejects_other_batch_or_size(random_small_ae):
    decoder = random_small_ae.stream_decoder(2)
    with pytest.raises(ValueError, match="made for batch size 2, got a chunk of batch size 1"):
        decoder.decode_chunk(torch.zeros(1, 1, 8, 16, 16))
    with torch.no_grad():
        decoder.decode_chunk(torch.zeros(2, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="latent size changed mid-stream"):
        decoder.decode_chunk(torch.zeros(2, 1, 8, 8, 8))


def test_wan_rejects_frame_counts_it_cannot_compress(tiny_wan):
    with pytest.raises(ValueError, match=r"takes 1 \+ 4k pixel frames \(temporal compression 4\), got 8 frames"):
        tiny_wan.encode(torch.zeros(1, 8, 3, 32, 32))
    with pytest.raises(ValueError, match="expects latents with 4 channels"):
        tiny_wan.decode(torch.zeros(1, 2, 16, 8, 8))


def test_missing_and_corrupt_weights(tmp_path, tiny_wan_dir):
    from selfforcing.autoencoders import SHIPPED

    folder = tmp_path / "ae"
    shutil.copytree(SHIPPED["moving-digits"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # truncated
    with pytest.raises(ValueError, match="corrupt autoencoder weights file .*model.safetensors"):
        get_autoencoder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights file not found: .*model.safetensors"):
        get_autoencoder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt autoencoder config .*config.json"):
        get_autoencoder(folder)
    with pytest.raises(FileNotFoundError, match="unknown autoencoder 'no-such-ae'"):
        get_autoencoder("no-such-ae")

    wan = tmp_path / "wan"
    shutil.copytree(tiny_wan_dir, wan)
    (wan / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="cannot load the Wan VAE weights"):
        get_autoencoder(wan)
    (wan / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="Wan VAE weights not found"):
        get_autoencoder(wan)


def test_identity_round_trip_is_exact_and_does_not_alias():
    ae = get_autoencoder("identity")
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    z = ae.encode(video)
    assert z.shape == video.shape and (ae.latent_channels, ae.spatial_compression) == (3, 1)
    assert torch.equal(ae.decode(z), video)
    z.zero_()
    assert video.abs().sum() > 0  # the latents are a copy


def test_wan_vae_in_bfloat16_returns_float32(tiny_wan_dir, tiny_wan):
    ae = get_autoencoder(tiny_wan_dir, dtype=torch.bfloat16)
    assert ae.vae.dtype == torch.bfloat16
    video = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z, z32 = ae.encode(video), tiny_wan.encode(video)
        assert z.dtype == torch.float32 and z.shape == (1, 2, 4, 4, 4)
        torch.testing.assert_close(z, z32, atol=0.1, rtol=0.05)
        assert ae.decode(z).dtype == torch.float32
