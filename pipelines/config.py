"""Typed dataclass configs <-> CLI flags, validation, and saving the resolved config.

Every dataclass field becomes ``--field-name``; its type comes from the annotation, its help from
``field(metadata={"help": ...})``. Later issues reuse this for presets (``tiny``/``base``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from .atomic_io import write_json_atomic
from .errors import ConfigError


def config_field(default, help_text: str, **extra):
    """A dataclass field whose help (and choices) become the CLI flag's. ``extra`` may also bound a number:
    ``above``/``at_least`` (lower bound, exclusive/inclusive) and ``at_most`` (upper bound, inclusive);
    ``check_fields`` enforces them."""
    return dataclasses.field(default=default, metadata={"help": help_text, **extra})


def check_fields(cfg) -> None:
    """Every float field of ``cfg`` is finite, and every bounded field (``config_field(above=, at_least=,
    at_most=)``) is within its bounds; else a ConfigError naming the flag, the bound and the value."""
    import math

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        meta = f.metadata
        for key, ok, word in (("above", lambda v, b: v > b, ">"), ("at_least", lambda v, b: v >= b, ">="),
                              ("at_most", lambda v, b: v <= b, "<=")):
            if key in meta and not ok(value, meta[key]):
                raise ConfigError(f"{flag} must be {word} {meta[key]}, got {value}")


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; defaults stay on the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default!r})"
        kwargs["help"] = help_text.replace("%", "%%")  # argparse %-formats help text: "72%" would crash --help
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"config field {cls.__name__}.{f.name}: unsupported type {tp!r}")
        if f.name in required:
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return make_config(cls, values)


def make_config(cls, values: dict):
    """Build ``cls`` from a dict, checking types so a wrong type names the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{cls.__name__}: unknown field {key!r}; known fields: {sorted(fields)}")
        tp, optional = _unwrap_optional(hints[key])
        if value is None and optional:
            continue
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"{cls.__name__}.{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
    cfg = cls(**values)
    check_fields(cfg)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path, **extra) -> None:
    """Save the resolved config (plus provenance such as versions) atomically as JSON."""
    payload = {"config_class": type(cfg).__name__, "config": config_to_dict(cfg), **extra}
    write_json_atomic(Path(path), payload)
