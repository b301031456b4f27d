"""Typed recipes: dataclasses filled from a YAML file, then from `section.key=value` overrides.

Every field of every section can be overridden from the command line; unknown keys and values
of the wrong type are errors that name the valid choices.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError


def parse_overrides(items: list[str] | None) -> dict:
    """['train.lr=1e-3', 'model.dim=64'] -> {'train': {'lr': 0.001}, 'model': {'dim': 64}}."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LmforgeError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LmforgeError(f"{where} must be a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise LmforgeError(f"{where} must be {tp.__name__}, got {value!r}")
    if origin in (list, dict) and not isinstance(value, origin):
        raise LmforgeError(f"{where} must be a {origin.__name__}, got {value!r}")
    return value


def build(cls, values: dict, where: str = ""):
    """Instantiate dataclass `cls` from a nested dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    # A recipe class may fill defaults that follow from other values (e.g. model.depth), seeing
    # exactly the keys the user gave.
    if hasattr(cls, "derived_defaults") and isinstance(values, dict):
        values = cls.derived_defaults(values)
    unknown = set(values) - fields
    if unknown:
        raise LmforgeError(f"unknown key(s) {sorted(unknown)} in {where or cls.__name__}; "
                           f"valid keys: {', '.join(sorted(fields))}")
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    # A dict section (e.g. `model`) is updated key by key, so `model.dim=64` keeps the preset.
    values = {k: merge(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
              for k, v in values.items()}
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"invalid {where or cls.__name__}: {e}") from e


def load_recipe(cls, path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict | None = None):
    values = dict(defaults or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LmforgeError(f"recipe not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except IsADirectoryError as e:
            raise LmforgeError(f"{path}: is a directory, not a recipe file") from e
        except yaml.YAMLError as e:
            raise LmforgeError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise LmforgeError(f"{path}: a recipe must be a mapping of sections")
        values = merge(values, loaded)
    return build(cls, merge(values, parse_overrides(overrides)))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --- range checks for __post_init__ of recipe sections ---------------------------------------
# Each raises LmforgeError naming the field as the user writes it (`section.key`).

def require(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise LmforgeError(f"{name} must be {rule}, got {value!r}")


def check_positive(obj, section: str, *names: str) -> None:
    for n in names:
        require(getattr(obj, n) > 0, f"{section}.{n}", "> 0", getattr(obj, n))


def check_non_negative(obj, section: str, *names: str) -> None:
    for n in names:
        require(getattr(obj, n) >= 0, f"{section}.{n}", ">= 0", getattr(obj, n))


def check_fraction(obj, section: str, *names: str) -> None:
    for n in names:
        require(0 <= getattr(obj, n) <= 1, f"{section}.{n}", "a fraction in [0, 1]", getattr(obj, n))


def check_choice(obj, section: str, name: str, choices) -> None:
    require(getattr(obj, name) in choices, f"{section}.{name}", f"one of {', '.join(map(str, choices))}",
            getattr(obj, name))
