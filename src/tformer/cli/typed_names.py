"""Errors name a setting as the user gave it: the config checks name keys (train.device=cuda,
decode.length_penalty), which a user who typed a flag (--device cuda, --length-penalty nan) never wrote.

A command maps each flag that is a shorthand for a config key to that key (argparse dest -> (section,
key)); the keys that a flag of the command line set are renamed to that flag in its errors. A key that a
later setting replaced (train's --set, which comes after its flags) keeps its name."""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

from tformer.config import ConfigError

FlagKeys = Mapping[str, tuple[str, str]]  # argparse dest -> (section, key)


def flag_option(dest: str) -> str:
    """The option an argparse dest is typed as: max_time -> --max-time."""
    return "--" + dest.replace("_", "-")


def typed_flags(args: argparse.Namespace, flag_keys: FlagKeys, *, overridden: Collection[str] = ()) -> dict[str, str]:
    """ "section.key" -> "--flag" for each key that a flag of the command line set (given: not None) and
    that no key of `overridden` (the "section.key"s a later setting gave) replaced."""
    typed = {}
    for dest, (section, key) in flag_keys.items():
        name = f"{section}.{key}"
        if getattr(args, dest, None) is not None and name not in overridden:
            typed[name] = flag_option(dest)
    return typed


def named_as_typed(
    message: str, args: argparse.Namespace, flag_keys: FlagKeys, *, overridden: Collection[str] = ()
) -> str:
    """`message` with each key that a flag set named by that flag: "train.device=cuda but ..." becomes
    "--device cuda but ...", "decode.length_penalty must be ..." becomes "--length-penalty must be ...".
    When it names a flag so, a key beside it that no setting gave is followed by its flag, if the command
    has one: "give both --valid-src and data.valid_tgt (--valid-tgt), or neither"."""
    typed = typed_flags(args, flag_keys, overridden=overridden)
    renamed = message
    for name, option in typed.items():
        renamed = re.sub(rf"\b{re.escape(name)}=(?=\S)", f"{option} ", renamed)
        renamed = re.sub(rf"\b{re.escape(name)}\b", option, renamed)
    if renamed == message:
        return message
    for dest, (section, key) in flag_keys.items():
        name = f"{section}.{key}"
        if name not in typed and name not in overridden and hasattr(args, dest):  # this command has the flag
            renamed = re.sub(rf"\b{re.escape(name)}\b(?!=)", f"{name} ({flag_option(dest)})", renamed)
    return renamed


@contextmanager
def errors_named_as_typed(
    args: argparse.Namespace, flag_keys: FlagKeys, *, overridden: Collection[str] = ()
) -> Iterator[None]:
    """A ConfigError raised inside, with its keys named as `named_as_typed` names them."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(named_as_typed(str(error), args, flag_keys, overridden=overridden)) from None
