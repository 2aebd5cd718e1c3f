"""Policy registries: `@GATING.register("topk")` on a class; unknown names list the known ones.

Every policy class has a `Knobs` dataclass (its tunable parameters, with defaults). The run
config's `gating.*`, `prefetch.*`, `cache.*` and `placement.*` keys other than `name` are
validated against it, so an unknown knob or a value of the wrong type is a clear error.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sim.errors import UserError
from sim.validate import check_knobs


class Registry:
    """Name -> policy class for one family (gating, prefetch, cache, placement)."""

    def __init__(self, family: str, package: str):
        self.family = family
        self.package = package
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str):
        def deco(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.family} policy {name!r} registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def _load_all(self) -> None:
        """Import every module of the family's package (each registers itself)."""
        if not self._loaded:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._loaded = True

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load_all()
        if name not in self._classes:
            raise UserError(f"unknown {self.family} policy {name!r}; known: {', '.join(self.names())}")
        return self._classes[name]

    def knobs(self, name: str, values: dict[str, Any]) -> Any:
        """Validate `values` against the policy's `Knobs` dataclass; return an instance."""
        cls = self.get(name)
        schema = getattr(cls, "Knobs", None)
        if schema is None:
            if values:
                raise UserError(f"{self.family} policy {name!r} takes no knobs; got {sorted(values)}")
            return None
        valid = [f.name for f in dataclasses.fields(schema)]
        for key in values:
            if key not in valid:
                raise UserError(
                    f"unknown key '{self.family}.{key}' for {self.family} policy {name!r}; "
                    f"valid: {', '.join(f'{self.family}.{k}' for k in ['name', *valid])}"
                )
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
