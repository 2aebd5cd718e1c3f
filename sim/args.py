"""Typed `key=value` arguments for every command, on OmegaConf structured configs.

A command declares its options as a dataclass; `parse_args` merges `config=FILE.yaml` (if given)
and the dotted `key=value` pairs on top, validated against that schema. Errors are `UserError`s
that name the key and list the valid ones (DESIGN 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

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


def _override_keys(schema: Any) -> dict[str, str]:
    """`{"model": "model_overrides"}`: a `str` field F beside a mapping field `F_overrides` takes
    dotted keys too: `model.layers=25` is `model_overrides.layers=25` (the name stays in `model`)."""
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: k + "_overrides" for k in _str_keys(schema) if "." not in k and k + "_overrides" in names}


def parse_args(schema: type[T], argv: list[str], *, allow_config_file: bool = True) -> T:
    """Build a `schema` instance from `[config=FILE.yaml] key=value ...`.

    Raises UserError for: an argument without `=`, an unknown key (lists the valid ones), a value
    of the wrong type, a number out of its range (`sim.validate`), a missing or unparsable config
    file. A `str` key takes its value as typed (`ray.address=::::` is that string, not YAML).
    A `str` key F with a mapping `F_overrides` beside it also takes `F.FIELD=VALUE`, stored in
    `F_overrides` (`model=deepseek-v2-lite model.layers=25`).
    """
    from sim.validate import check_args

    pairs = split_pairs(argv)
    base = OmegaConf.structured(schema)
    layers = []
    text_keys = _str_keys(schema)
    keys = valid_keys(schema)
    overridable = _override_keys(schema)
    dotlist, texts = [], []
    for pair in pairs:
        key, _, value = pair.partition("=")
        head, dot, rest = key.partition(".")
        if dot and head in overridable:
            key = f"{overridable[head]}.{rest}"
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
    return check_args(obj, _limits_for(schema))  # type: ignore[return-value]


def _limits_for(schema: Any) -> Any:
    """The range table (`sim.validate.LIMITS`) of `schema` or of the nearest base that has one (a
    command's options dataclass extending another's keeps its ranges); None: check_args's default."""
    from sim.validate import LIMITS

    for klass in getattr(schema, "__mro__", ()):
        if klass.__name__ in LIMITS:
            return LIMITS[klass.__name__]
    return None


#: the key under which a results folder's `config.yaml` records what its run resolved to
PROVENANCE_KEY = "resolved"


def _load_yaml(path: Path) -> Any:
    """A `config=FILE.yaml` as an OmegaConf layer. A run's own `config.yaml` (it holds the
    provenance block `resolved:`) is checked and loaded without that block and without the keys
    that placed its output (`sim.results.folder.rerun_config`), so that it runs again as it was."""
    from sim.errors import read_yaml_mapping

    data = read_yaml_mapping(path, "config file", "keys to values")
    if PROVENANCE_KEY in data:
        from sim.results.folder import rerun_config

        data = rerun_config(data, path)
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as err:
        raise UserError(f"config file {path}: {str(err).splitlines()[0]}") from None
