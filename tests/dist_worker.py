"""Run by tests/test_training.py under torchrun (or alone): a few training steps, then the final weights and the
exit steps every rank used are written to OUT/<tag>.rank<r>.pt."""

import os
import sys

import torch

from selfforcing.config import build_config
from selfforcing.training import distributed as D
from selfforcing.training.checkpoint import gather_model_state
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train


def main(out: str, tag: str, parallel: str, batch_size: int, steps: int, sharded_resume: bool = False) -> None:
    cfg = build_config(TrainConfig, dict(
        method="self_forcing", parallel=parallel, batch_size=batch_size, max_steps=steps, seed=3,
        out_dir=os.path.join(out, tag), checkpoint_every=1 if sharded_resume else 0, tensorboard=False,
        checkpoint_format="sharded" if sharded_resume else "full",
        generator={"preset": "tiny", "overrides": {"num_layers": 2}},
        data={"kind": "random", "latent_shape": [6, 8, 4, 4], "text_len": 4},
        dm={"critic_updates_per_generator_update": 1}, ema_weight=0.9,
        generator_optim={"lr": 1e-4}, critic_optim={"lr": 1e-4},
    ))
    if sharded_resume:  # stop one step short, then resume from the sharded checkpoint in a fresh state
        train(cfg, max_steps=steps - 1, progress=False, resume=False)
        assert os.path.isdir(os.path.join(cfg.out_dir, "checkpoints", f"step_{steps - 1:06d}"))
        state = train(cfg, progress=False, resume=True)
    else:
        state = train(cfg, progress=False, resume=False)
    weights = {k: gather_model_state(m) for k, m in state.models.items()}
    torch.save({"weights": weights, "exits": state.method.exit_history}, os.path.join(out, f"{tag}.rank{D.rank()}.pt"))
    D.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), len(sys.argv) > 6 and sys.argv[6] == "sharded")
