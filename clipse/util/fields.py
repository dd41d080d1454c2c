"""Dataclass fields that carry their command-line flag, so each setting's default and help text
exist once: in the field. ``TrainConfig``, the loss parameters and the option dataclasses of
``clipse.search`` and ``clipse.final`` are all written with ``setting`` and turned into argparse
options by ``add_arguments``.

A field's *key* is how users write it in YAML files and search spaces (its name unless
``key=`` says otherwise, as for ``lambda``); its flag is ``--key`` with dashes unless ``flag=``
says otherwise. Only fields made with a help text become flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any, Callable

from clipse.util.errors import UserError


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None,
            key: str | None = None, choices: tuple | Callable[[], tuple] | None = None, group: str | None = None,
            metavar: str | None = None, shown_default: Any = None, nested: bool = False,
            nested_by: Callable[[], dict[str, type]] | None = None) -> Any:
    """A dataclass field with the metadata that makes it a flag. ``choices`` and
    ``shown_default`` (the default the help names, when not the field's own) may be functions,
    evaluated when the parser is built, for registries that grow; ``group`` tags related
    settings (``data``, ``model``); ``nested`` marks a field holding another options dataclass;
    ``nested_by`` a dict of them, one per name of a registry (each executor backend's options),
    whose flags each plug-in defines in its own module."""
    metadata = {"help": help, "flag": flag, "key": key, "choices": choices, "group": group, "metavar": metavar,
                "shown_default": shown_default, "nested": nested, "nested_by": nested_by}
    metadata = {k: v for k, v in metadata.items() if v is not None and v is not False}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def key_of(f: Field) -> str:
    return f.metadata.get("key", f.name)


def flag_of(f: Field) -> str:
    return f.metadata.get("flag", "--" + key_of(f).replace("_", "-"))


def kind_of(f: Field) -> str:
    """bool, int, float, str, path, list or dict (``X | None`` counts as X)."""
    text = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace(" | None", "").strip()
    if text.startswith(("list", "tuple")):
        return "list"
    if text.startswith("dict"):
        return "dict"
    return {"Path": "path"}.get(text, text)


def is_optional(f: Field) -> bool:
    return "None" in str(f.type)


def choices_of(f: Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_flag(f: Field) -> bool:
    return any(f.metadata.get(key) for key in ("help", "nested", "nested_by"))


def keys_in_group(cls, group: str) -> tuple[str, ...]:
    return tuple(key_of(f) for f in dataclasses.fields(cls) if f.metadata.get("group") == group)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def add_argument(parser, f: Field, *, dest: str, default: Any, shown_default: Any = MISSING) -> None:
    """One option for one field. ``default`` is what argparse stores when the flag is absent
    (``argparse.SUPPRESS`` to tell "not given" apart); ``shown_default`` goes into the help."""
    kind = kind_of(f)
    shown = f.metadata.get("shown_default", default_of(f) if shown_default is MISSING else shown_default)
    shown = shown() if callable(shown) else shown
    help_text = f.metadata["help"] + ("" if shown in (None, MISSING, [], {}) else f" (default: {shown})")
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": help_text}
    if default is MISSING:
        kwargs.update(required=True, default=None)
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind in ("list", "dict"):
        kwargs["action"] = "append"
        kwargs["type"] = _key_value if kind == "dict" else str
        kwargs.setdefault("metavar", "KEY=VALUE" if kind == "dict" else "VALUE")
        if default is not argparse.SUPPRESS:
            kwargs["default"] = None  # appended values replace the default, see from_arguments
    else:
        kwargs["type"] = {"int": int, "float": float, "str": str, "path": Path}[kind]
        kwargs.setdefault("metavar", kind.upper() if kind in ("int", "float", "path") else "VALUE")
        choices = choices_of(f)
        if choices:
            kwargs["choices"] = choices
            kwargs.pop("metavar", None)
    parser.add_argument(flag_of(f), **kwargs)


def _nested_class(f: Field) -> type:
    return f.default_factory if f.default_factory is not MISSING else type(f.default)


def add_arguments(parser, cls, *, prefix: str = "", container=None) -> None:
    """Options for the flag fields of the dataclass ``cls``; a nested options dataclass gets
    its own argument group, titled by its docstring's first line."""
    container = container or parser
    for f in dataclasses.fields(cls):
        if not is_flag(f):
            continue
        if f.metadata.get("nested"):
            nested = _nested_class(f)
            group = parser.add_argument_group((nested.__doc__ or f.name).strip().splitlines()[0])
            add_arguments(parser, nested, prefix=f"{prefix}{f.name}.", container=group)
            continue
        if f.metadata.get("nested_by"):
            for name, nested in f.metadata["nested_by"]().items():
                group = parser.add_argument_group((nested.__doc__ or name).strip().splitlines()[0])
                add_arguments(parser, nested, prefix=f"{prefix}{f.name}.{name}.", container=group)
            continue
        add_argument(container, f, dest=prefix + f.name, default=default_of(f))


def from_arguments(cls, args: argparse.Namespace, *, prefix: str = "", **given: Any):
    """An instance of ``cls`` from what ``add_arguments`` parsed (``given`` wins)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given or not is_flag(f):
            continue
        if f.metadata.get("nested"):
            values[f.name] = from_arguments(_nested_class(f), args, prefix=f"{prefix}{f.name}.")
            continue
        if f.metadata.get("nested_by"):
            values[f.name] = {name: from_arguments(nested, args, prefix=f"{prefix}{f.name}.{name}.")
                              for name, nested in f.metadata["nested_by"]().items()}
            continue
        value = getattr(args, prefix + f.name)
        kind = kind_of(f)
        if kind in ("list", "dict") and value is None:
            value = default_of(f)
        elif kind == "dict":
            value = dict(value)
        values[f.name] = value
    return cls(**values, **given)


def check_at_least(options, minimum: int, *names: str) -> None:
    """One line naming the flag when a count is below ``minimum``."""
    by_name = {f.name: f for f in dataclasses.fields(options)}
    for name in names:
        if getattr(options, name) < minimum:
            raise UserError(f"{flag_of(by_name[name])} must be at least {minimum}")
