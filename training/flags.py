"""Command-line flags generated from a config dataclass, and the config read back from them.

Each field ``name`` becomes ``--name`` (underscores as dashes) with the field's type, default and
the help, choices and metavar of its metadata (``training.config.setting``); a bool becomes
``--name/--no-name``, a field without a default a required flag. So a default is written once, in
the dataclass, and ``config_from_args`` builds the config from the parsed flags by field name.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """int for ``int`` and ``int | None``; the same for float, str and bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def add_config_flags(
    parser: argparse.ArgumentParser,
    config: type[Any],
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    help_suffix: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``config``.

    ``choices`` gives the valid names of fields whose values come from a registry (data sets,
    backprop modes), ``help_suffix`` text to append to a field's help.
    """
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "") + (help_suffix or {}).get(f.name, "")}
        value_type = _value_type(hints[f.name])
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = value_type
            valid = (choices or {}).get(f.name) or meta.get("choices")
            if valid:
                kwargs["choices"] = list(valid)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_name(f.name), **kwargs)


def config_from_args(config: type[C], args: argparse.Namespace) -> C:
    """The dataclass ``config`` built from the parsed flags of its fields (other flags ignored)."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})  # type: ignore[arg-type]
