"""Recipes: plain YAML files merged over typed defaults (dataclasses). Unknown keys are errors.

A recipe is a YAML mapping whose keys are the fields of a dataclass (nested dataclasses are nested
mappings). ``load_config(path, Schema, overrides=["train.lr=1e-4", ...])`` returns a ``Schema``
instance: defaults from the dataclass, then the file, then the ``key=value`` overrides (values parsed
as YAML, so ``true``, ``3``, ``[1, 2]`` work). A key that is not a field, or a value of the wrong
type, raises :class:`ConfigError` naming the file, the dotted key and the expected type.

A recipe may start with ``base: other.yaml`` (relative to itself) to inherit another recipe.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that does not fit its schema."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (converting int->float and lists->tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; {cls.__name__} has: {sorted(fields)}"
        )
    base = cls()
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            # a partial nested mapping is merged over the parent's default for that field
            value = _deep_merge(dataclasses.asdict(getattr(base, name)), value)
        kwargs[name] = _coerce(value, hints[name], key)
    for name in fields:
        kwargs.setdefault(name, getattr(base, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a value check of the dataclass: its message starts with the key
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None
    except ValueError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a recipe file (following ``base:``) into a plain dict; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(read_yaml(os.path.join(os.path.dirname(path), base)), data)
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return data


def build_config(cls: type[T], data: dict | None = None, overrides: list[str] | None = None, source: str = "") -> T:
    """``cls`` defaults <- ``data`` <- ``overrides``; ConfigError names ``source`` and the bad key."""
    try:
        return _build(cls, apply_overrides(data or {}, overrides))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None


def load_config(path: str | os.PathLike, cls: type[T], overrides: list[str] | None = None) -> T:
    """Load recipe ``path`` into dataclass ``cls`` (see the module docstring)."""
    return build_config(cls, read_yaml(path), overrides, source=os.fspath(path))


def plain_data(v):
    """Nested lists / tuples / dicts as JSON- and YAML-safe plain data (tuples become lists)."""
    if isinstance(v, (list, tuple)):
        return [plain_data(x) for x in v]
    if isinstance(v, dict):
        return {k: plain_data(x) for k, x in v.items()}
    return v


def to_dict(cfg) -> dict:
    """A config dataclass as a plain dict (tuples become lists), e.g. to save beside a checkpoint."""
    return plain_data(dataclasses.asdict(cfg))


def save_config(cfg, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
