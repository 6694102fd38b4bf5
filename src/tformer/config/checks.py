"""The checks every config dataclass runs on its own values, and the error they raise.

Each `__post_init__` calls them with its section's name, so a config built in Python is held to the
same rules as one read from TOML (`tformer.config.loading`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says how to fix it."""


# Float settings for which infinity means something: no limit (as 0 does). Earlier versions accepted
# `--max-time inf` and stored it, so such runs must keep loading.
UNLIMITED_BY_INF = frozenset({"max_time_s"})


def check_types(config: Any, section: str) -> None:
    """Refuse a value of the wrong type in an int, float, bool or str field (or its optional form), as
    `config_from_dict` refuses one read from a file. Built in Python, DecodeConfig(beam_size="4") failed in
    its own range check with "'<' not supported between instances of 'str' and 'int'", and
    DecodeConfig(beam_size=4.0) was accepted and failed deep inside the search. Runs first in each
    `__post_init__`, so the checks after it compare values of the right types."""
    for name, (hint, optional) in _simple_fields(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        if hint is int:
            right, wanted = hasattr(value, "__index__") and not isinstance(value, bool), "an integer"
            if right and type(value) is not int:  # numpy's int64, say: stored as the int it stands for
                object.__setattr__(config, name, operator.index(value))
        elif hint is float:
            right, wanted = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        elif hint is bool:
            right, wanted = isinstance(value, bool), "True or False"
        else:
            right, wanted = isinstance(value, str), "a string"
        if not right:
            raise ConfigError(
                f"{section}.{name} must be {wanted}{' or None' if optional else ''}; got {value!r} "
                f"({type(value).__name__})"
            )


def check_finite(config: Any, section: str) -> None:
    """Refuse NaN in every float field of a config dataclass, and infinities except where they mean
    "no limit" (UNLIMITED_BY_INF).

    NaN passes every range check written as a comparison (`nan <= 0` is false), so it would reach
    training or decoding and fail there, or silently do nothing; an infinite learning rate or length
    penalty means nothing. Runs first in each `__post_init__`, so the range checks after it see numbers."""
    for name in _float_fields(type(config)):
        value = getattr(config, name)
        if not isinstance(value, int | float) or math.isfinite(value):
            continue
        if math.isinf(value) and value > 0 and name in UNLIMITED_BY_INF:
            continue
        raise ConfigError(f"{section}.{name} must be a finite number, got {value}")


def check_int64(config: Any, section: str) -> None:
    """Refuse an integer field that does not fit in 64 bits, as torch holds it (translate --beam 10**22
    was an OverflowError traceback from torch). Runs last in each `__post_init__`, after the checks of
    the field's own range, whose messages say more."""
    for name in _int_fields(type(config)):
        value = getattr(config, name)
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{section}.{name} must be a 64-bit integer (below 2**63 in size), got {value}")


def check_choices(config: Any, section: str) -> None:
    """Refuse a value outside its field's Literal choices. Configs read from files are checked when they
    are read (`config_from_dict`); this covers configs built in Python, where a typo such as
    norm_position="Pre" would otherwise silently build the default architecture."""
    for name, choices in _choice_fields(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """The fields annotated with a Literal, and their allowed values."""
    hints = typing.get_type_hints(cls)
    return {
        field.name: typing.get_args(hints[field.name])
        for field in dataclasses.fields(cls)
        if typing.get_origin(hints[field.name]) is Literal
    }


@functools.cache
def _simple_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """The fields annotated int, float, bool or str, or one of them | None: name -> (type, optional)."""
    simple = (int, float, bool, str)
    fields = {}
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        inner = [option for option in options if option is not type(None)]
        if len(inner) == 1 and inner[0] in simple:
            fields[field.name] = (inner[0], len(options) > 1)
    return fields


@functools.cache
def _int_fields(cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(field.name for field in dataclasses.fields(cls) if hints[field.name] is int)


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields annotated `float` (cached: configs are rebuilt by dataclasses.replace often)."""
    hints = typing.get_type_hints(cls)
    return tuple(field.name for field in dataclasses.fields(cls) if hints[field.name] is float)
