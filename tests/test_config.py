from dataclasses import dataclass, field

import pytest

from selfforcing.config import ConfigError, build_config, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Recipe:
    name: str = "x"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    generator_optim: Optim = field(default_factory=lambda: Optim(lr=2e-6))
    method: str | None = None


def test_defaults_file_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 20\noptim:\n  lr: 1e-4\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\ngenerator_optim:\n  betas: [0.0, 0.999]\n")
    cfg = load_config(child, Recipe, overrides=["steps=30", "optim.betas=[0.5, 0.9]"])
    assert cfg.name == "child" and cfg.steps == 30
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.5, 0.9)
    # a partial nested mapping keeps the parent's own default for the other fields
    assert cfg.generator_optim.lr == 2e-6 and cfg.generator_optim.betas == (0.0, 0.999)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml", Recipe) == cfg


@pytest.mark.parametrize("data,match", [
    ({"stepz": 3}, "unknown config key stepz"),
    ({"optim": {"learning_rate": 1}}, "unknown config key optim.learning_rate"),
    ({"steps": "many"}, "steps: expected int"),
    ({"steps": True}, "steps: expected int"),
    ({"optim": {"betas": [0.9]}}, r"optim.betas: expected 2 items"),
])
def test_bad_recipes_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        build_config(Recipe, data)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", Recipe)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad, Recipe)
    with pytest.raises(ConfigError, match="not key=value"):
        build_config(Recipe, {}, ["steps"])


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    import stat

    from selfforcing.fileio import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("override,match", [
    ("log_every=0", r"recipe.yaml: log_every must be >= 1 .*got 0"),
    ("checkpoint_every=-1", r"checkpoint_every must be >= 0 .*got -1"),
    ("sample_every=-5", r"sample_every must be >= 0"),
    ("keep_checkpoints=-1", r"keep_checkpoints must be >= 0"),
    ("max_steps=-1", r"max_steps must be >= 0"),
    ("grad_accum=0", r"grad_accum must be >= 1"),
    ("ema_weight=1.0", r"ema_weight must be >= 0 and < 1"),
    ("data.num_frames=0", r"data.num_frames must be >= 1"),
    ("generator_optim.lr=0", r"generator_optim.lr must be > 0"),
    ("critic_optim.warmup_steps=-2", r"critic_optim.warmup_steps must be >= 0"),
    ("dm.critic_updates_per_generator_update=0", r"dm.critic_updates_per_generator_update must be >= 1"),
])
def test_train_config_checks_intervals_and_counts(tmp_path, override, match):
    """Intervals and counts of a training recipe are checked when it loads: a ConfigError names the file and key
    (``log_every=0`` used to divide by zero after the first step, ``checkpoint_every=-1`` was accepted)."""
    from selfforcing.training.config import TrainConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: teacher\nmax_steps: 4\n")
    assert load_config(recipe, TrainConfig).log_every == 10  # the file itself is fine
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, TrainConfig, [override])
