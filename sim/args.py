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


def parse_args(schema: type[T], argv: list[str], *, allow_config_file: bool = True) -> T:
    """Build a `schema` instance from `[config=FILE.yaml] key=value ...`.

    Raises UserError for: an argument without `=`, an unknown key (lists the valid ones), a value
    of the wrong type, a missing or unparsable config file.
    """
    pairs = split_pairs(argv)
    base = OmegaConf.structured(schema)
    layers = []
    dotlist = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "config" and allow_config_file:
            layers.append(_load_yaml(Path(value)))
        else:
            dotlist.append(f"{key}={value}")
    keys = valid_keys(schema)
    try:
        merged = OmegaConf.merge(base, *layers, OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err).split("\n")[0]
        raise UserError(f"unknown key {key!r}; valid keys: {', '.join(keys)}") from None
    except ValidationError as err:
        key = getattr(err, "full_key", "?")
        msg = str(err).split("\n")[0]
        raise UserError(f"bad value for {key!r}: {msg}") from None
    except OmegaConfBaseException as err:
        raise UserError(str(err).split("\n")[0]) from None


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return OmegaConf.create(data)
