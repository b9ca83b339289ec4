"""``--config FILE``: a run's settings read from JSON, in the layout of a run's ``config.json``.

    {"train": {"epochs": 3, "lr": 0.002, ...}, "model": {"quantizer": "rvq", ...}}

Both sections are optional and may list any subset of :class:`~vqvae.train.TrainConfig`'s and
:class:`~vqvae.models.ModelConfig`'s fields; a run directory's own ``config.json`` is a valid
file. Every key and the type of every value are checked here, so a typo is an error that names
the key and the type it expects, not a setting silently ignored. Flags given on the command line
override the file (see ``common.configs``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from .common import UsageError

SECTIONS = ("train", "model")


def _describe(hint) -> str:
    """The JSON a type annotation asks for, in words."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string", dict: "a JSON object"}.get(
        typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def _fits(value: Any, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON's true/false are not integers here
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, list)
    return isinstance(value, hint)


def _section(values: Any, name: str, config_class: type, path: Path) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UsageError(f"{path}: {name!r} must be a JSON object of "
                         f"{config_class.__name__} fields, got {type(values).__name__}")
    hints = typing.get_type_hints(config_class)
    fields = [f.name for f in dataclasses.fields(config_class)]
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise UsageError(f"{path}: unknown key {name}.{key}; {name} takes "
                             f"{', '.join(fields)}")
        if not _fits(value, hints[key]):
            raise UsageError(f"{path}: {name}.{key} must be {_describe(hints[key])}, got "
                             f"{json.dumps(value)} ({type(value).__name__})")
        # an integer where a number is asked for is that number (lr: 1 means 1.0)
        checked[key] = float(value) if hints[key] is float else value
    return checked


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``train`` and ``model`` settings of a JSON config file, each checked against its
    config class; anything wrong is a :class:`UsageError` naming the key and expected type."""
    from ..models import ModelConfig
    from ..train import TrainConfig

    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a JSON object with 'train' and/or 'model', got "
                         f"{type(values).__name__}")
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; the file holds 'train' and/or "
                         f"'model' objects (the layout of a run's config.json)")
    return (_section(values.get("train", {}), "train", TrainConfig, path),
            _section(values.get("model", {}), "model", ModelConfig, path))
