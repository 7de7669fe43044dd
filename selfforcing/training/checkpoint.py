"""Training checkpoints: written atomically (temp file + rename), full or sharded, with everything needed to
resume exactly: step, model and optimiser states, EMA shadow, and the config.

Layout under ``<out_dir>/checkpoints/``: ``step_000200.pt`` (full: one file written by rank 0) or
``step_000200/`` (sharded: torch.distributed.checkpoint, every rank writes its shards), plus ``latest``
(a text file naming the newest complete checkpoint, replaced atomically after the checkpoint is complete).
"""

from __future__ import annotations

import os
import re
import shutil

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..fileio import atomic_write, atomic_write_text
from .distributed import barrier, is_main


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temp file and a rename (see ``selfforcing.fileio``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _full_opts() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict on CPU; a collective under FSDP2 (call on every rank)."""
    return get_model_state_dict(model, options=_full_opts())


def _sharded_state(models: dict, optimizers: dict, ema) -> dict:
    """The local (sharded) state that torch.distributed.checkpoint saves and loads in place."""
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    state.update({f"optim.{k}": get_optimizer_state_dict(models[k], o) for k, o in optimizers.items()})
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(ckpt_dir: str, step: int, models: dict, optimizers: dict, ema, extra: dict,
                    sharded: bool = False, keep: int = 2) -> str:
    """Write checkpoint ``step`` (collective: every rank calls it). Returns its path.

    Besides weights, optimiser and EMA states it records each network's architecture (its config), so a resume
    into a differently built network fails clearly instead of loading same-shaped weights into it."""
    os.makedirs(ckpt_dir, exist_ok=True)
    extra = {**extra, "architectures": architectures_of(models)}
    name = f"step_{step:06d}"
    if sharded:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(ckpt_dir, name)
        tmp = path + ".tmp"
        if is_main() and os.path.exists(tmp):
            shutil.rmtree(tmp)
        barrier()
        state = _sharded_state(models, optimizers, ema)
        dcp.save(state, checkpoint_id=tmp)
        barrier()
        if is_main():
            atomic_torch_save({"step": step, **extra}, os.path.join(tmp, "meta.pt"))
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    else:
        path = os.path.join(ckpt_dir, name + ".pt")
        state = {
            "step": step,
            "models": {k: gather_model_state(m) for k, m in models.items()},
            "optimizers": {k: get_optimizer_state_dict(models[k], o, options=_full_opts()) for k, o in optimizers.items()},
            "ema": ema.full_state_dict() if ema is not None else None,
            **extra,
        }
        # the exported generator, in the layout `generate` and the release tools read
        state["generator"] = state["models"]["generator"]
        if ema is not None and ema.initialized:
            state["generator_ema"] = state["ema"]["shadow"]
        if is_main():
            atomic_torch_save(state, path)
    barrier()
    if is_main():
        atomic_write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(path) + "\n")
        _prune(ckpt_dir, keep)
    barrier()
    return path


def _prune(ckpt_dir: str, keep: int) -> None:
    found = sorted(p for p in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{6}(\.pt)?", p))
    for p in found[:-keep] if keep > 0 else []:
        full = os.path.join(ckpt_dir, p)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint (named by ``latest``), or None."""
    marker = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        name = fh.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{marker} names {name}, which does not exist in {ckpt_dir}")
    return path


def architectures_of(models: dict) -> dict:
    """{name: architecture config} of the networks (plain values; diffusers' private ``_`` keys left out)."""
    out = {}
    for name, m in models.items():
        config = getattr(m, "config", None)
        if config is not None:
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
                         if not k.startswith("_")}
    return out


def check_architectures(path: str, saved: dict | None, models: dict) -> None:
    """Raise ValueError naming the fields where a checkpoint's recorded architectures differ from ``models``'.
    Checkpoints written before architectures were recorded (``saved`` None) are not checked."""
    if not saved:
        return
    now = architectures_of(models)
    for name, arch in saved.items():
        if name not in now:
            continue
        diff = {k: (arch.get(k), now[name].get(k)) for k in set(arch) | set(now[name])
                if arch.get(k) != now[name].get(k)}
        if diff:
            fields = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{path}: the {name} in this checkpoint was built differently ({fields}); resume "
                             f"with the recipe (preset and overrides) it was trained with, or start a new out_dir")


def load_checkpoint(path: str, models: dict, optimizers: dict, ema) -> dict:
    """Restore models, optimisers and EMA from ``path`` (full file or sharded dir); returns its meta (step...).
    A network built differently from the one saved (its recorded architecture) is a ValueError."""
    if os.path.isdir(path):
        meta = torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=False)
        check_architectures(path, meta.get("architectures"), models)
        import torch.distributed.checkpoint as dcp

        state = _sharded_state(models, optimizers, ema)
        dcp.load(state, checkpoint_id=path)
        for k, m in models.items():
            set_model_state_dict(m, state[f"model.{k}"])
        for k, o in optimizers.items():
            set_optimizer_state_dict(models[k], o, state[f"optim.{k}"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        return meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot read training checkpoint {path}: {err}") from err
    check_architectures(path, state.get("architectures"), models)
    for k, m in models.items():
        set_model_state_dict(m, state["models"][k], options=StateDictOptions(full_state_dict=True))
    for k, o in optimizers.items():
        set_optimizer_state_dict(models[k], o, state["optimizers"][k], options=StateDictOptions(full_state_dict=True))
    if ema is not None and state.get("ema") is not None:
        ema.load_full_state_dict(state["ema"])
    return state
