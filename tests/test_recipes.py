"""Every recipe in configs/ parses against the typed defaults, and every tiny recipe trains for a few steps."""

import glob
import os

import pytest
import torch

from selfforcing.config import load_config
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(__file__))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                 if not os.path.basename(p).startswith("_") and "autoencoder" not in p)
TINY = [p for p in RECIPES if os.sep + "tiny" + os.sep in p]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_recipe_parses(path):
    cfg = load_config(path, TrainConfig)
    assert cfg.method in ("teacher", "teacher_forcing", "diffusion_forcing", "ode_init", "causvid", "self_forcing")
    if "/wan/" in path:  # the paper's settings
        assert cfg.generator.preset == "wan2.1-t2v-1.3b" and cfg.rollout.denoising_steps == (1000, 750, 500, 250)
        assert cfg.dm.critic_updates_per_generator_update in (1, 5) and cfg.ema_weight == 0.99


def test_the_recipes_cover_every_method():
    names = {os.path.basename(p)[:-5] for p in TINY}
    assert names >= {"teacher", "teacher_forcing", "diffusion_forcing", "causvid", "ode_init", "self_forcing_dmd",
                     "self_forcing_sid", "self_forcing_gan"}


@pytest.mark.parametrize("path", TINY, ids=lambda p: os.path.basename(p))
def test_tiny_recipe_runs_a_few_steps(path, tmp_path):
    """(e) each tiny recipe, with its own data pipeline (Moving-Digits -> autoencoder -> MiniLM), from random
    weights instead of the earlier stages' checkpoints (or training state), runs 2 steps with finite losses."""
    overrides = [f"out_dir={tmp_path}", "batch_size=2", "generator.checkpoint=null", "teacher=null", "critic=null",
                 "checkpoint_every=0", "tensorboard=false", "dm.critic_updates_per_generator_update=1",
                 "generator.overrides.num_layers=2", "data.num_frames=6", "init_from=null"]
    cfg = load_config(path, TrainConfig, overrides)
    if cfg.data.kind == "store" and cfg.method == "teacher":  # the teacher's store of encoded clips: render them
        cfg = load_config(path, TrainConfig, overrides + ["data.kind=moving-digits", "data.image_batch_size=3"])
    elif cfg.data.kind == "store":  # ODE pairs come from a teacher run: use ODE states on random latents here
        cfg = load_config(path, TrainConfig, overrides + ["data.kind=random", "data.latent_shape=[6, 8, 16, 16]",
                                                          "data.text_len=24"])
    state = train(cfg, max_steps=2, progress=False, resume=False)
    losses = [v for h in state.history for k, v in h.items() if k.endswith("loss")]
    assert state.step == 2 and losses and all(torch.isfinite(torch.tensor(losses)))
