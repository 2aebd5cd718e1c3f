"""Policy registries: `@GATING.register("topk")` on a class; unknown names list the known ones.

Every policy class has a `Knobs` dataclass (its tunable parameters, with defaults). The run
config's `gating.*`, `prefetch.*`, `cache.*` and `placement.*` keys other than `name` are
validated against it, so an unknown knob or a value of the wrong type is a clear error.

Plug-ins: a policy outside this package registers itself the same way, from a module that is
imported before the policies are resolved:

- `plugins=pkg.module,other` (a `RunConfig` key; every command that runs policies takes it) or
  `plugins=path/to/file.py`: `load_plugins`, called by `sim.config.parse_run_config` and by
  every sweep worker before its first point;
- an installed distribution's entry point in the group `moe_offload_sim.policies`
  (`[project.entry-points."moe_offload_sim.policies"] name = "pkg.module"`): loaded once, the
  first time any registry (or the preset table) is asked for its names. An entry point that
  names a function (`"pkg.module:setup"`) has that function called with no arguments.

A plug-in may add policy presets with `policies.presets.register_preset`. A plug-in cannot
replace a policy that exists (built-in or another plug-in's): that is a `UserError` naming both.
A plug-in that cannot be imported, or raises on import, is one line naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sim.errors import UserError
from sim.validate import check_knobs

ENTRY_POINT_GROUP = "moe_offload_sim.policies"


class Registry:
    """Name -> policy class for one family (gating, prefetch, cache, placement)."""

    def __init__(self, family: str, package: str):
        self.family = family
        self.package = package
        self._classes: dict[str, type] = {}
        self._builtins_loaded = False
        self._loading = False

    def _builtin(self, cls: type) -> bool:
        return cls.__module__.startswith(self.package + ".")

    def register(self, name: str):
        """Class decorator: register a policy under `name`. A plug-in's name must be new."""

        def deco(cls: type) -> type:
            if not self._builtin(cls):
                self._load_builtins()  # so that a plug-in clashing with a built-in is told so now
            have = self._classes.get(name)
            if have is not None and have is not cls:
                same = (have.__module__, have.__qualname__) == (cls.__module__, cls.__qualname__)
                if not same:  # (the same class again: its module was imported anew, e.g. reloaded)
                    if self._builtin(cls) and self._builtin(have):
                        raise ValueError(f"{self.family} policy {name!r} registered twice")
                    raise UserError(
                        f"{self.family} policy {name!r} of {cls.__module__} is already registered by "
                        f"{have.__module__}: a plug-in cannot replace an existing policy; register it "
                        f"under another name")
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def _load_builtins(self) -> None:
        """Import every module of the family's package (each registers itself)."""
        if self._builtins_loaded or self._loading:
            return
        self._loading = True
        try:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
        finally:
            self._loading = False
        self._builtins_loaded = True

    def _load_all(self) -> None:
        self._load_builtins()
        load_entry_points()

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load_all()
        if name not in self._classes:
            raise UserError(f"unknown {self.family} policy {name!r}; known: {', '.join(self.names())}"
                            + ("" if _plugins_loaded else
                               " (a policy of your own: plugins=MODULE or plugins=FILE.py)"))
        return self._classes[name]

    def knob_fields(self, name: str) -> list[dataclasses.Field]:
        """The fields of policy `name`'s `Knobs` dataclass (none if it takes no knobs)."""
        schema = getattr(self.get(name), "Knobs", None)
        return list(dataclasses.fields(schema)) if schema is not None else []

    def section_keys(self, name: str) -> list[str]:
        """Every key the family's config section takes with policy `name`: `name`, its knobs and the
        engine's keys of that section (the cache's sizes, `prefetch.into`)."""
        from sim.config import (
            ENGINE_KEYS,  # they size the cache or route prefetches rather than tune a policy
        )

        extra = list(ENGINE_KEYS.get(self.family, ()))
        return ["name", *(f.name for f in self.knob_fields(name)), *extra]

    def knobs(self, name: str, values: dict[str, Any]) -> Any:
        """Validate `values` against the policy's `Knobs` dataclass; return an instance."""
        cls = self.get(name)
        schema = getattr(cls, "Knobs", None)
        valid_keys = ", ".join(f"{self.family}.{k}" for k in self.section_keys(name))
        if schema is None:
            if values:
                raise UserError(f"{self.family} policy {name!r} takes no knobs; got {sorted(values)} "
                                f"(valid: {valid_keys})")
            return None
        valid = [f.name for f in dataclasses.fields(schema)]
        for key in values:
            if key not in valid:
                raise UserError(f"unknown key '{self.family}.{key}' for {self.family} policy {name!r}; "
                                f"valid: {valid_keys}")
        try:
            knobs = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
        except (ValidationError, ConfigKeyError) as err:
            key = getattr(err, "full_key", "?")
            raise UserError(f"bad value for '{self.family}.{key}': {str(err).splitlines()[0]}") from None
        except OmegaConfBaseException as err:
            raise UserError(f"{self.family} policy {name!r}: {str(err).splitlines()[0]}") from None
        return check_knobs(self.family, knobs)  # every number finite and in range (sim/validate.py)


GATING = Registry("gating", "policies.gating")
PREFETCH = Registry("prefetch", "policies.prefetch")
CACHE = Registry("cache", "policies.cache")
PLACEMENT = Registry("placement", "policies.placement")
FAMILIES = {"gating": GATING, "prefetch": PREFETCH, "cache": CACHE, "placement": PLACEMENT}


# ----------------------------------------------------------------------------------- plug-ins

_entry_points_loaded = False
_entry_points_loading = False
_plugins_loaded: dict[str, str] = {}  # plug-in as given -> the module name it was imported as


def _first_line(err: BaseException) -> str:
    text = " ".join((str(err).strip().splitlines() or [""])[0].split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_entry_points() -> None:
    """Load the installed plug-ins of the entry-point group `moe_offload_sim.policies` (once)."""
    global _entry_points_loaded, _entry_points_loading
    if _entry_points_loaded or _entry_points_loading:  # loading: a plug-in asking a registry does not recurse
        return
    _entry_points_loading = True
    try:
        _load_entry_points()
        _entry_points_loaded = True  # only once every one loaded: a failed one is reported again next time
    finally:
        _entry_points_loading = False


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for fam in FAMILIES.values():  # a plug-in clashing with a built-in of any family is told so
        fam._load_builtins()
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on the path
            continue
        seen.add((ep.name, ep.value))
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"plug-in entry point {ep.name!r} ({ep.value}{', of ' + dist if dist else ''}; group {ENTRY_POINT_GROUP})"
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except Exception as err:  # noqa: BLE001 - whatever a third-party module raises: one line
            raise UserError(f"{where} failed to load: {_first_line(err)}") from None


def split_plugins(spec: str | Iterable[str] | None) -> list[str]:
    """`"a.b, c.py"` -> `["a.b", "c.py"]` (empty items dropped)."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if str(s).strip()]


def is_plugin_file(item: str) -> bool:
    return item.endswith(".py") or "/" in item or "\\" in item


def load_plugins(spec: str | Iterable[str] | None) -> list[str]:
    """Import each plug-in of `spec` (comma-separated module names or `.py` files) once, after the
    built-in policies and the entry-point plug-ins; return the module names. UserError naming the
    plug-in if it cannot be found or raises on import."""
    items = split_plugins(spec)
    if not items:
        return []
    for fam in FAMILIES.values():
        fam._load_builtins()
    load_entry_points()
    return [_load_one(item) for item in items]


def _load_one(item: str) -> str:
    if item in _plugins_loaded and _plugins_loaded[item] in sys.modules:
        return _plugins_loaded[item]
    try:
        if is_plugin_file(item):
            name = _import_file(item)
        else:
            name = _import_module(item)
    except UserError as err:
        raise UserError(f"plug-in {item!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a plug-in raising on import: one line naming it
        raise UserError(f"plug-in {item!r} raised on import: {_first_line(err)}") from None
    _plugins_loaded[item] = name
    return name


def _import_module(item: str) -> str:
    if not all(part.isidentifier() for part in item.split(".")):
        raise UserError(f"{item!r} is not a module name (give pkg.module, or a path to a .py file)")
    try:
        importlib.import_module(item)
    except ModuleNotFoundError as err:
        if err.name is not None and (item == err.name or item.startswith(err.name + ".")):
            raise UserError(f"no module named {err.name!r} (is it on PYTHONPATH, or installed?)") from None
        raise
    return item


def _import_file(item: str) -> str:
    path = Path(item).expanduser()
    if not path.is_file():
        raise UserError("file not found")
    path = path.resolve()
    stem = path.stem if path.stem.isidentifier() else "plugin"
    name = f"sim_plugin_{stem}"
    have = sys.modules.get(name)
    if have is not None and Path(getattr(have, "__file__", "") or "").resolve() != path:
        name = f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {item} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return name


def plugin_sources() -> dict[str, str]:
    """The plug-ins this process imported: as given -> module name (for workers and provenance)."""
    return dict(_plugins_loaded)
