"""The causal Wan model against the reference implementations in diffusers (acceptance a, b, f, g)."""

import pytest
import torch
from conftest import make_model
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

from selfforcing.models import CausalWanModel
from selfforcing.models.state_dict_adapter import from_original_wan, load_checkpoint_file, to_original_wan


def _to_ref(x):  # ours [B, F, C, H, W] <-> diffusers [B, C, F, H, W]
    return x.permute(0, 2, 1, 3, 4)


def test_state_dict_keys_and_shapes_match_diffusers_both_ways(wan_config):
    ref = WanTransformer3DModel(**wan_config)
    ours = make_model(wan_config)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in our_sd.items()}
    ref.load_state_dict(our_sd, strict=True)
    ours.load_state_dict(ref_sd, strict=True)


@pytest.mark.parametrize("frames,height,width", [(5, 6, 10), (4, 8, 8)])
def test_bidirectional_equals_wan_transformer(wan_config, frames, height, width):
    """(a) causal=False with one timestep per sample == diffusers.WanTransformer3DModel, <= 1e-4."""
    ours = make_model(wan_config)
    ref = WanTransformer3DModel(**wan_config).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, wan_config["in_channels"], height, width, generator=g)
    t = torch.tensor([37.0, 910.0])
    ctx = torch.randn(2, 7, wan_config["text_dim"], generator=g)
    with torch.no_grad():
        expected = _to_ref(ref(_to_ref(x), t, ctx).sample)
        got = ours(x, t, ctx, causal=False)
        # the same timestep given per frame must change nothing
        got_per_frame = ours(x, t[:, None].expand(2, frames), ctx, causal=False)
    assert got.shape == (2, frames, wan_config["out_channels"], height, width)
    assert (got - expected).abs().max() <= 1e-4
    assert (got_per_frame - got).abs().max() <= 1e-6


@pytest.mark.parametrize("block", [2, 3])
@pytest.mark.parametrize("per_block_t", [True, False])
def test_block_causal_equals_skyreels_diffusion_forcing(wan_config, block, per_block_t):
    """(b) block-causal mode with per-frame timesteps == SkyReelsV2Transformer3DModel(enable_diffusion_forcing).

    How SkyReels-V2 differs from us, and what is therefore checked:
    * It applies its block-causal mask only when num_frame_per_block > 1 (with 1 it attends
      bidirectionally), so only block sizes > 1 are compared; it has no KV cache, no rolling window,
      sinks, teacher-forcing layout or independent first frame (those are tested against our own full
      masked forward in test_kv_cache.py).
    * Its timestep sinusoid is computed by get_1d_sincos_pos_embed_from_grid instead of diffusers'
      Timesteps: the same function, so we check agreement to float32 rounding (1e-4), not bit equality.
    * It applies modulation per token (a frame's vector repeated over its tokens); we apply it per frame
      by broadcasting: equal numbers.
    * It accepts timesteps that vary inside a block; so do we, and both cases are compared.
    """
    frames = 2 * block
    ours = make_model(wan_config, num_frame_per_block=block)
    ref = SkyReelsV2Transformer3DModel(**wan_config, num_frame_per_block=block).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, frames, wan_config["in_channels"], 6, 4, generator=g)
    if per_block_t:
        t = (torch.rand(2, 2, generator=g) * 1000).repeat_interleave(block, dim=1)
    else:
        t = torch.rand(2, frames, generator=g) * 1000
    ctx = torch.randn(2, 5, wan_config["text_dim"], generator=g)
    with torch.no_grad():
        expected = _to_ref(ref(_to_ref(x), t, ctx, enable_diffusion_forcing=True).sample)
        got = ours(x, t, ctx, causal=True)
    assert (got - expected).abs().max() <= 1e-4
    # and the causal output differs from the bidirectional one for every block but the last
    with torch.no_grad():
        bidir = ours(x, t, ctx, causal=False)
    assert (bidir[:, :block] - got[:, :block]).abs().max() > 1e-3


def _wrap_variants(original):
    yield "bare", dict(original)
    yield "model. prefix", {f"model.{k}": v for k, v in original.items()}
    yield "model.diffusion_model. prefix", {f"model.diffusion_model.{k}": v for k, v in original.items()}
    yield "generator", {"generator": {f"model.{k}": v for k, v in original.items()}}
    yield "generator_ema", {"generator_ema": {f"model.{k}": v for k, v in original.items()},
                            "generator": {f"model.{k}": torch.zeros_like(v) for k, v in original.items()}}


def test_original_wan_format_loads_through_diffusers_converter(wan_config, tmp_path):
    """(f) original-Wan keys (blocks.0.self_attn.q.weight ...), bare or wrapped, give identical outputs."""
    ours = make_model(wan_config, seed=3, num_frame_per_block=2)
    sd = ours.state_dict()
    original = to_original_wan(sd)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.0.modulation" in original and "head.modulation" in original
    # our inverse mapping is the exact inverse of diffusers' converter
    back = from_original_wan(dict(original))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, wan_config["in_channels"], 4, 6, generator=g)
    t = torch.tensor([[500.0, 500.0, 10.0, 10.0]])
    ctx = torch.randn(1, 3, wan_config["text_dim"], generator=g)
    with torch.no_grad():
        expected = ours(x, t, ctx, causal=True)
    for name, obj in _wrap_variants(original):
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(obj, path)
        fresh = make_model(wan_config, seed=99, num_frame_per_block=2)
        fresh.load_weights(load_checkpoint_file(path, use_ema=(name == "generator_ema")))
        with torch.no_grad():
            assert torch.equal(fresh(x, t, ctx, causal=True), expected), name


def test_save_pretrained_round_trip(wan_config, tmp_path):
    ours = make_model(wan_config, seed=5, num_frame_per_block=2, local_attn_size=4, sink_size=1)
    ours.save_pretrained(tmp_path / "m")
    loaded = CausalWanModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.local_attn_size == 4 and loaded.config.sink_size == 1
    assert loaded.config.num_frame_per_block == 2
    x = torch.randn(1, 4, wan_config["in_channels"], 4, 4)
    t, ctx = torch.tensor([[900.0, 900.0, 0.0, 0.0]]), torch.randn(1, 3, wan_config["text_dim"])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), ours(x, t, ctx))
    also = CausalWanModel.from_checkpoint(str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(also.state_dict().values(), ours.state_dict().values()))
    # a file checkpoint needs the architecture
    torch.save({"generator": ours.state_dict()}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="preset"):
        CausalWanModel.from_checkpoint(str(tmp_path / "g.pt"))


def test_wan_1_3b_preset_matches_reference_parameter_count():
    """(g) the 1.3B preset has exactly the parameters of WanTransformer3DModel with the Wan2.1-T2V-1.3B config."""
    wan13 = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("meta"):
        ours = CausalWanModel.from_preset("wan2.1-t2v-1.3b")
        ref = WanTransformer3DModel(**wan13)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref
    assert 1.40e9 < n_ours < 1.43e9
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name,low,high", [("tiny", 1.5e6, 2.5e6), ("small", 7.5e6, 10.5e6),
                                           ("wan2.1-t2v-14b", 1.3e10, 1.5e10)])
def test_other_presets_have_their_stated_sizes(name, low, high):
    with torch.device("meta"):
        model = CausalWanModel.from_preset(name)
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_original_wan_release_folder_with_sharded_safetensors(wan_config, tmp_path):
    """A Wan2.1 release folder (original key names split over safetensors shards, non-diffusers config.json)."""
    import json

    from safetensors.torch import save_file

    ours = make_model(wan_config, seed=6, num_frame_per_block=2)
    original = to_original_wan(ours.state_dict())
    keys = sorted(original)
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 24}))
    save_file({k: original[k].contiguous() for k in keys[: len(keys) // 2]}, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: original[k].contiguous() for k in keys[len(keys) // 2:]}, folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    import selfforcing.models.presets as presets

    presets.PRESETS["_test"] = dict(wan_config, num_frame_per_block=2)
    try:
        loaded = CausalWanModel.from_checkpoint(str(folder), preset="_test")
    finally:
        del presets.PRESETS["_test"]
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
