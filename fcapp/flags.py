"""CLI flags generated from a config dataclass, so a setting is defined and documented in one place.

A field declared with `option` carries its help text (and, where it differs from --field-name, its flag) in
its metadata; `add_arguments` turns the fields into argparse flags, `from_args` builds the config back from
the parsed flags. Flags default to None, so a flag not given keeps the dataclass's own default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Iterable, Literal


def option(default: Any, help: str, flag: str | None = None, **metadata: Any) -> Any:
    """A config field with its help text, optionally its CLI flag, and any further metadata (e.g. methods)."""
    metadata = {"help": help, "flag": flag, **metadata}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _argument_type(config_cls: type, name: str) -> tuple[Any, dict[str, Any]]:
    """The argparse `type` (and extra keywords) for a field's annotation."""
    hint = typing.get_type_hints(config_cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str, {"choices": list(typing.get_args(hint))}
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        return lambda text: [part.strip() for part in text.split(",") if part.strip()], {}
    return hint, {}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser, config_cls: type, names: Iterable[str] | None = None,
                  skip: Iterable[str] = (), required: Iterable[str] = ()) -> None:
    """One flag per documented field of `config_cls` (those in `names`, when given, less `skip`); the fields
    in `required` must be given."""
    wanted, skipped, needed = (set(names) if names is not None else None), set(skip), set(required)
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata or f.name in skipped or (wanted is not None and f.name not in wanted):
            continue
        kind, extra = _argument_type(config_cls, f.name)
        long_name = "--" + f.name.replace("_", "-")
        flag = f.metadata["flag"] or long_name
        default = _default(f)
        default = ",".join(map(str, default)) if isinstance(default, list) else default
        shown = "" if default in (None, "") or f.name in needed else f" (default: {default})"
        kwargs = {"type": kind} if kind is not None else {}
        parser.add_argument(*dict.fromkeys([flag, long_name]), dest=f.name, default=None, required=f.name in needed,
                            help=f.metadata["help"] + shown, **kwargs, **extra)


def from_args(config_cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """A `config_cls` from parsed flags (those not given keep the dataclass defaults) and `fixed` values."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
             if getattr(args, f.name, None) is not None}
    return config_cls(**(given | fixed))
