"""Bad input gets a ValueError that names what was expected and what was given; nothing is broadcast."""

import pytest
import torch
from conftest import WAN_CONFIGS, make_model

from selfforcing.models import CausalWanModel, KVCache
from selfforcing.models.state_dict_adapter import load_checkpoint_file

CFG = WAN_CONFIGS["a"]


@pytest.fixture(scope="module")
def model():
    return make_model(CFG, num_frame_per_block=2)


def _x(f=4, c=CFG["in_channels"], h=4, w=4, b=2):
    return torch.zeros(b, f, c, h, w)


def _ctx(b=2, d=CFG["text_dim"]):
    return torch.zeros(b, 3, d)


@pytest.mark.parametrize("x,match", [
    (torch.zeros(2, 4, 4, 4), r"latents \[B, F, C, H, W\]"),
    (_x(c=3), "3 latent channels, the model expects in_channels=4"),
    (_x(h=5), "not divisible by the patch size"),
])
def test_bad_latents(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x, torch.zeros(x.shape[0]), _ctx())


def test_block_size_must_divide_frames(model):
    with pytest.raises(ValueError, match="5 latent frames cannot be split into blocks of num_frame_per_block=2"):
        model(_x(f=5), torch.zeros(2), _ctx())
    model(_x(f=5), torch.zeros(2), _ctx(), causal=False)  # bidirectional mode has no blocks


@pytest.mark.parametrize("t", [torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 4, 1), torch.tensor(5.0)])
def test_bad_timestep_shapes(model, t):
    with pytest.raises(ValueError, match=r"timestep must be \[B\]=\[2\] or \[B, F\]=\[2, 4\]"):
        model(_x(), t, _ctx())


@pytest.mark.parametrize("ctx", [torch.zeros(2, 3, 15), torch.zeros(1, 3, 16), torch.zeros(2, 16)])
def test_bad_context_shapes(model, ctx):
    with pytest.raises(ValueError, match=r"context must be text states \[B, L, text_dim\]=\[2, L, 16\]"):
        model(_x(), torch.zeros(2), ctx)


def test_cache_too_small_without_rolling_window(model):
    cache = model.new_kv_cache(2, 4, 4, max_frames=4)
    with torch.no_grad():
        model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=0)
        model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=2)
        with pytest.raises(ValueError, match="KV cache too small: it holds 4 frames and has no rolling window"):
            model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=4)


def test_cache_misuse_is_named(model):
    cache = model.new_kv_cache(2, 4, 4, max_frames=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="expected start_frame=0"):
            model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=2)
        model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="made for 4 tokens per frame, the input has 2"):
            model(_x(f=2, h=2, w=4), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=2)
        with pytest.raises(ValueError, match="batch size 2, the input has 1"):
            model(_x(f=2, b=1), torch.zeros(1), _ctx(b=1), kv_cache=cache, start_frame=2)
        with pytest.raises(ValueError, match="was written with 2"):
            model(_x(f=1), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="needs causal=True"):
            model(_x(f=2), torch.zeros(2), _ctx(), kv_cache=cache, start_frame=2, causal=False)
    with pytest.raises(ValueError, match="sink_frames needs a rolling window"):
        KVCache(num_layers=1, batch_size=1, num_heads=1, head_dim=4, tokens_per_frame=1, max_frames=4, sink_frames=1)


def test_bad_configs_and_presets():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        CausalWanModel.from_preset("huge")
    with pytest.raises(ValueError, match="window minus sinks"):
        CausalWanModel(**CFG, num_frame_per_block=3, local_attn_size=4, sink_size=2)
    with pytest.raises(ValueError, match="patch_size"):
        CausalWanModel(**dict(CFG, patch_size=(2, 2, 2)))


def test_teacher_forcing_shape_mismatch(model):
    with pytest.raises(ValueError, match="clean_x shape"):
        model(_x(), torch.zeros(2), _ctx(), clean_x=_x(f=2))


def test_bad_checkpoints_name_the_file(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint_file(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"generator": model.state_dict()}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="cannot read checkpoint .*corrupt.pt"):
        load_checkpoint_file(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": {"n": torch.tensor(3)}}, other)
    with pytest.raises(ValueError, match="other.pt: no generator weights"):
        load_checkpoint_file(other)
    ema = tmp_path / "noema.pt"
    torch.save({"generator": model.state_dict()}, ema)
    with pytest.raises(ValueError, match="generator_ema"):
        load_checkpoint_file(ema, use_ema=True)
    small = make_model(dict(CFG, num_layers=1))
    with pytest.raises(ValueError, match="does not fit this model config: missing"):
        small.load_weights(model.state_dict())
