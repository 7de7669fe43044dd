import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Two small Wan configs: every equivalence test runs on both.
WAN_CONFIGS = {
    "a": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True, eps=1e-6),
    "b": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=6, out_channels=5,
              text_dim=10, freq_dim=16, ffn_dim=24, num_layers=3, cross_attn_norm=False, eps=1e-6),
}


@pytest.fixture(params=sorted(WAN_CONFIGS))
def wan_config(request):
    return dict(WAN_CONFIGS[request.param])


def make_model(config: dict, seed: int = 0, **causal):
    from selfforcing.models import CausalWanModel

    torch.manual_seed(seed)
    model = CausalWanModel(**config, **causal).eval()
    # random, non-trivial values everywhere (default init leaves some biases/gains at 0/1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
