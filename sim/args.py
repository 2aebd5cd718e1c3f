"""Typed `key=value` arguments for every command, on OmegaConf structured configs.

A command declares its options as a dataclass; `parse_args` merges `config=FILE.yaml` (if given)
and the dotted `key=value` pairs on top, validated against that schema. Errors are `UserError`s
that name the key and list the valid ones (DESIGN 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from sim.errors import UserError

T = TypeVar("T")


def valid_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a dataclass schema, e.g. `cache.slots`."""
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        sub = f.type if dataclasses.is_dataclass(f.type) else None
        default = getattr(schema, f.name, None) if not isinstance(schema, type) else None
        if sub is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            sub = type(value) if dataclasses.is_dataclass(value) else None
        if sub is None and dataclasses.is_dataclass(default):
            sub = type(default)
        if sub is not None:
            keys += valid_keys(sub, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def split_pairs(argv: list[str]) -> list[str]:
    """Check that every argument is `key=value`; return them unchanged."""
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise UserError(f"argument {arg!r} is not of the form key=value")
    return argv


def _str_keys(schema: Any, prefix: str = "") -> set[str]:
    """Dotted keys of `str` fields: their value is taken as typed, never parsed as YAML (`::::`)."""
    import typing

    out: set[str] = set()
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - unresolvable annotations: parse every value
        return out
    for f in dataclasses.fields(schema):
        hint = hints.get(f.name)
        if hint is str:
            out.add(prefix + f.name)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= _str_keys(hint, prefix + f.name + ".")
    return out


def parse_args(schema: type[T], argv: list[str], *, allow_config_file: bool = True) -> T:
    """Build a `schema` instance from `[config=FILE.yaml] key=value ...`.

    Raises UserError for: an argument without `=`, an unknown key (lists the valid ones), a value
    of the wrong type, a number out of its range (`sim.validate`), a missing or unparsable config
    file. A `str` key takes its value as typed (`ray.address=::::` is that string, not YAML).
    """
    from sim.validate import check_args

    pairs = split_pairs(argv)
    base = OmegaConf.structured(schema)
    layers = []
    text_keys = _str_keys(schema)
    keys = valid_keys(schema)
    dotlist, texts = [], []
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "config" and allow_config_file:
            layers.append(_load_yaml(Path(value)))
        elif key in text_keys:
            texts.append((key, value))
        else:
            dotlist.append(f"{key}={value}")
    try:
        override = OmegaConf.from_dotlist(dotlist)
        for key, value in texts:  # the string keys and the others are disjoint: order is kept per key
            OmegaConf.update(override, key, value, merge=True)
        merged = OmegaConf.merge(base, *layers, override)
        obj = OmegaConf.to_object(merged)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err).split("\n")[0]
        raise UserError(f"unknown key {key!r}; valid keys: {', '.join(keys)}") from None
    except ValidationError as err:
        key = getattr(err, "full_key", "?")
        msg = str(err).split("\n")[0]
        raise UserError(f"bad value for {key!r}: {msg}") from None
    except OmegaConfBaseException as err:
        raise UserError(str(err).split("\n")[0]) from None
    return check_args(obj)  # type: ignore[return-value]


def _load_yaml(path: Path) -> Any:
    from sim.errors import read_text

    text = read_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as err:
        raise UserError(f"config file {path}: {str(err).splitlines()[0]}") from None
