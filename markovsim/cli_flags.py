"""Command-line flags generated from a frozen dataclass's fields, so no flag list is typed out by hand.

One flag per field, ``--field-name`` (or a renamed flag), its argparse type from the annotation:

    bool            --x / --no-x (argparse.BooleanOptionalAction)
    int, float      type=int / float; a ``T | None`` field also takes the word ``none``
    str             type=str, choices from the field's metadata when given
    tuple[T, T]     nargs = the tuple's length
    tuple[T, ...]   nargs = "+" (one or more values)

Help text comes from the field's ``metadata["help"]`` (:func:`markovsim.config.setting`). Flags
default to "not given" (``argparse.SUPPRESS``), so :func:`given_values` returns exactly what the
user set. Both command lines use this one generator (``llm.flags`` re-exports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .config import field_help

__all__ = ["add_dataclass_flags", "given_values", "flag_name", "optional_inner"]


def flag_name(field_name: str) -> str:
    """``learning_rate`` -> ``--learning-rate``."""
    return "--" + field_name.replace("_", "-")


def optional_inner(hint) -> tuple[object, bool]:
    """``(T, True)`` for ``T | None``, else ``(hint, False)``."""
    arguments = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in arguments:
        return next(a for a in arguments if a is not type(None)), True
    return hint, False


def _parser(kind: type, optional: bool):
    """A string -> value converter named for argparse's "invalid <name> value" message."""

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        return kind(text)

    convert.__name__ = f"{kind.__name__}{' or none' if optional else ''}"
    return convert


def argparse_options(hint, metadata) -> dict:
    """``add_argument`` keyword arguments for a field annotated ``hint`` with ``metadata``."""
    inner, optional = optional_inner(hint)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        count = "+" if len(items) == 2 and items[1] is Ellipsis else len(items)
        return {"nargs": count, "type": _parser(items[0], False), "metavar": items[0].__name__.upper()}
    options = {"type": _parser(inner, optional)}
    if metadata.get("choices"):
        options["choices"] = list(metadata["choices"]) + ([None] if optional else [])
    return options


def add_dataclass_flags(group, cls, prefix: str, renamed: dict[str, str] | None = None,
                        skip: typing.Collection[str] = (),
                        only: typing.Callable[[object], bool] | None = None) -> dict[str, str]:
    """Add one flag per field of ``cls`` (except ``skip``) to ``group``; returns ``{field: flag}``.

    Args:
        cls: the dataclass.  prefix: the destination prefix (``"dynamics"`` stores ``dynamics:steps``).
        renamed: flag names that differ from :func:`flag_name` (``{"seed": "--data-seed"}``).
        only: keep the fields whose type annotation passes this test (None = every field).
    """
    hints, flags = typing.get_type_hints(cls), {}
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init or (only is not None and not only(hints[field.name])):
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        options = argparse_options(hints[field.name], field.metadata)
        if options.get("action") is None and "choices" not in options:
            options.setdefault("metavar", field.name.upper())
        flags[field.name] = (renamed or {}).get(field.name, flag_name(field.name))
        group.add_argument(flags[field.name], dest=f"{prefix}:{field.name}", default=argparse.SUPPRESS,
                           help=f"{field_help(field) or cls.__name__ + '.' + field.name} (default: {default})",
                           **options)
    return flags


def given_values(arguments: argparse.Namespace, prefix: str) -> dict:
    """The fields set on the command line under ``prefix`` (see :func:`add_dataclass_flags`)."""
    start = prefix + ":"
    values = {name[len(start):]: value for name, value in vars(arguments).items() if name.startswith(start)}
    return {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
