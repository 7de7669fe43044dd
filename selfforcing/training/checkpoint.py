"""Training checkpoints: written atomically (temp file + rename), full or sharded, with everything needed to
resume exactly: step, model and optimiser states, EMA shadow, and the config.

Layout under ``<out_dir>/checkpoints/``: ``step_000200.pt`` (full: one file written by rank 0) or
``step_000200/`` (sharded: torch.distributed.checkpoint, every rank writes its shards), plus ``latest``
(a text file naming the newest complete checkpoint, replaced atomically after the checkpoint is complete).
A write in progress lives under a ``.tmp-`` name; temp files left by a killed write are removed after the next
write and when training starts (:func:`selfforcing.fileio.remove_stale_temps`).

Resume (:func:`resume_checkpoint`) loads the newest checkpoint that reads back intact; a corrupt or truncated one
is skipped with a :class:`CheckpointWarning` naming the file and the reason.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import warnings

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import reason
from ..fileio import TEMP_PREFIX, atomic_write, atomic_write_text, remove_stale_temps
from .distributed import barrier, is_main

_STEP_NAME = re.compile(r"step_(\d{6,})(\.pt)?")


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be read back (truncated, empty, missing parts); the message names it and why."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped at resume (the message names it and the reason)."""


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
        tmp = os.path.join(ckpt_dir, TEMP_PREFIX + name)
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
            "optimizers": {k: get_optimizer_state_dict(models[k], o, options=_full_opts())
                           for k, o in optimizers.items()},
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
        remove_stale_temps(ckpt_dir)  # what a killed earlier write left behind
    barrier()
    return path


def checkpoint_paths(ckpt_dir: str) -> list[str]:
    """The checkpoints in ``ckpt_dir`` (``step_NNNNNN.pt`` files and ``step_NNNNNN/`` folders), newest step first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir) if (m := _STEP_NAME.fullmatch(name))]
    return [os.path.join(ckpt_dir, name) for _, name in sorted(found, reverse=True)]


def _prune(ckpt_dir: str, keep: int) -> None:
    for full in checkpoint_paths(ckpt_dir)[keep:] if keep > 0 else []:
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


# config fields that set how a model streams (its KV cache's rolling window and sinks), not its weights or its
# function over a full sequence: a resumed run may change them (e.g. a long-horizon stage that rolls its cache)
STREAM_POLICY_FIELDS = frozenset({"local_attn_size", "sink_size"})


def _config_defaults(model) -> dict:
    """The constructor's default of each config field of ``model`` (tuples as lists, as :func:`architectures_of`)."""
    params = inspect.signature(type(model).__init__).parameters.values()
    return {p.name: (list(p.default) if isinstance(p.default, tuple) else p.default) for p in params
            if p.default is not inspect.Parameter.empty}


def check_architectures(path: str, saved: dict | None, models: dict) -> None:
    """Raise ValueError naming the fields where a checkpoint's recorded architectures differ from ``models``'
    (:data:`STREAM_POLICY_FIELDS` excepted). Checkpoints written before architectures were recorded (``saved`` None)
    are not checked; a field the checkpoint does not record (it was written before the option existed) reads as the
    option's default, with which that model was built."""
    if not saved:
        return
    now = architectures_of(models)
    for name, recorded in saved.items():
        if name not in now:
            continue
        arch = {**_config_defaults(models[name]), **recorded}
        diff = {k: (arch.get(k), now[name].get(k)) for k in (set(recorded) | set(now[name])) - STREAM_POLICY_FIELDS
                if arch.get(k) != now[name].get(k)}
        if diff:
            fields = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{path}: the {name} in this checkpoint was built differently ({fields}); resume "
                             f"with the recipe (preset and overrides) it was trained with, or start a new out_dir")


def read_checkpoint(path: str) -> dict:
    """The saved state of a full checkpoint file (or the ``meta.pt`` of a sharded folder, whose shards
    :func:`load_checkpoint` reads in place). Raises :class:`CorruptCheckpoint` naming the file and the reason when
    it is missing, empty, truncated or not a training checkpoint."""
    if os.path.isdir(path):
        meta_path = os.path.join(path, "meta.pt")
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CorruptCheckpoint(f"{path}: no .metadata (the sharded write did not finish)")
        state = _torch_read(meta_path)
    else:
        state = _torch_read(path)
        if "models" not in state:
            raise CorruptCheckpoint(f"{path}: not a training checkpoint (no 'models')")
    if "step" not in state:
        raise CorruptCheckpoint(f"{path}: not a training checkpoint (no 'step')")
    return state


def _torch_read(path: str) -> dict:
    if not os.path.isfile(path):
        raise CorruptCheckpoint(f"{path}: missing")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpoint(f"{path}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not intact
        raise CorruptCheckpoint(f"{path}: cannot be read ({reason(err)})") from err
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path}: holds a {type(state).__name__}, not a checkpoint")
    return state


def load_checkpoint(path: str, models: dict, optimizers: dict, ema, state: dict | None = None) -> dict:
    """Restore models, optimisers and EMA from ``path`` (full file or sharded dir); returns its meta (step...).
    ``state``: what :func:`read_checkpoint` returned for it (read now when None). An unreadable checkpoint is a
    :class:`CorruptCheckpoint`; a network built differently from the one saved (its recorded architecture) is a
    ValueError."""
    state = read_checkpoint(path) if state is None else state
    check_architectures(path, state.get("architectures"), models)
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp

        sharded = _sharded_state(models, optimizers, ema)
        dcp.load(sharded, checkpoint_id=path)
        for k, m in models.items():
            set_model_state_dict(m, sharded[f"model.{k}"])
        for k, o in optimizers.items():
            set_optimizer_state_dict(models[k], o, sharded[f"optim.{k}"])
        if ema is not None:
            ema.load_state_dict(sharded["ema"])
        return state
    for k, m in models.items():
        set_model_state_dict(m, state["models"][k], options=StateDictOptions(full_state_dict=True))
    for k, o in optimizers.items():
        set_optimizer_state_dict(models[k], o, state["optimizers"][k], options=StateDictOptions(full_state_dict=True))
    if ema is not None and state.get("ema") is not None:
        ema.load_full_state_dict(state["ema"])
    return state


def _load_newest_intact(paths: list[str], models: dict, optimizers: dict, ema) -> dict | None:
    """Load the first of ``paths`` (newest first) that reads back intact and return its meta; a corrupt one is
    skipped with a :class:`CheckpointWarning` naming it and the reason. None: no path was intact."""
    for path in paths:
        try:
            state = read_checkpoint(path)
        except CorruptCheckpoint as err:
            warnings.warn(f"skipping checkpoint {err}", CheckpointWarning, stacklevel=3)  # err starts with the path
            continue
        return load_checkpoint(path, models, optimizers, ema, state=state)
    return None


def resume_checkpoint(ckpt_dir: str, models: dict, optimizers: dict, ema) -> dict | None:
    """Load the newest checkpoint in ``ckpt_dir`` that reads back intact; returns its meta (None: nothing to resume).

    A corrupt one (truncated, empty, half-written sharded folder) is skipped with a :class:`CheckpointWarning` naming
    it and the reason, and the next older one is tried; when none is intact training starts over (warned too). A
    checkpoint of a differently built network is an error, not a skip."""
    paths = checkpoint_paths(ckpt_dir)
    meta = _load_newest_intact(paths, models, optimizers, ema)
    if meta is None and paths:
        warnings.warn(f"no intact checkpoint in {ckpt_dir} ({len(paths)} skipped): training starts from step 0",
                      CheckpointWarning, stacklevel=2)
    return meta


def load_init_from(path: str, models: dict, optimizers: dict, ema) -> dict:
    """Another run's training state for a new stage (``init_from``); returns its meta. ``path`` is a checkpoint (a
    file, or a sharded folder with ``meta.pt``), loaded as it is, or a run's ``checkpoints`` folder or the run folder
    holding one, whose newest intact checkpoint is loaded (corrupt ones skipped and warned, as on resume). A path
    with no checkpoint is a FileNotFoundError, one whose checkpoints are all corrupt a :class:`CorruptCheckpoint`,
    both naming it."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "meta.pt")):
        return load_checkpoint(path, models, optimizers, ema)
    for folder in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(folder) and (paths := checkpoint_paths(folder)):
            meta = _load_newest_intact(paths, models, optimizers, ema)
            if meta is None:
                raise CorruptCheckpoint(f"{path}: none of its {len(paths)} checkpoints reads back intact")
            return meta
    raise FileNotFoundError(f"{path}: no training checkpoint there (a step_*.pt file, a sharded step folder, or a "
                            f"run whose checkpoints/ folder holds one)")
