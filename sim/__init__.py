"""moe-offload-sim: a trace-driven discrete-event simulator of MoE expert offloading.

Packages: `sim` (engine, CLI, trace I/O, tracer, real-run backend) and `policies`
(gating, prefetch, cache and placement policies, one file each).
Nothing here imports torch at module level: `run` and `sweep` stay light.

The Python API (`sim/api.py`, docs/api.md) is exported here and imported on first use:

    import sim
    res = sim.run(hw="rtx4090.yaml", policy="adapmoe", cache={"slots": 64})
    table = sim.sweep({"policy": ["baseline", "adapmoe"], "cache.slots": [32, 64]})

`sim.sweep` is also the name of the sweep package (`sim/sweep/`): the package module is made
callable, so `sim.sweep(grid, ...)` runs a sweep and `sim.sweep.run_sweep`, `from sim.sweep import
...` keep working.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

#: The repository root (an editable install keeps `hwprofiles/`, `traces/` and `models/` here).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: names exported from `sim.api`, imported on first use
_API = ("Result", "load_profile", "load_trace", "policies", "presets", "profiles", "run", "traces")

__all__ = ["REPO_ROOT", "__version__", *_API, "sweep"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from sim import api

        return getattr(api, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableSweepPackage(types.ModuleType):
    """The `sim.sweep` package, callable as `sim.api.sweep`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from sim.api import sweep

        return sweep(*args, **kwargs)


class _SimModule(types.ModuleType):
    """`sim`, whose `sweep` attribute is the sweep package made callable (see the module docstring).

    The import system sets `sim.sweep` to the package when it is imported; the setter keeps it, the
    getter imports it on first use and gives it its callable class."""

    @property
    def sweep(self) -> Any:
        pkg = self.__dict__.get("sweep")
        if pkg is None:
            import importlib

            pkg = importlib.import_module("sim.sweep")  # sets self.sweep through the setter below
        if not isinstance(pkg, _CallableSweepPackage) and isinstance(pkg, types.ModuleType):
            pkg.__class__ = _CallableSweepPackage
        return pkg

    @sweep.setter
    def sweep(self, value: Any) -> None:
        self.__dict__["sweep"] = value


sys.modules[__name__].__class__ = _SimModule
