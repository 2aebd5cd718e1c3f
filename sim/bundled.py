"""Where the bundled data lives: hardware profiles, traces, models and policy data.

The repository keeps them in top-level folders (`hwprofiles/`, `traces/`, `models/`) beside the
packages; a wheel ships the same folders as package data under `sim/_bundled/` (pyproject.toml maps
each folder there, without moving it). So:

    checkout (editable install, or the source tree)   <root>/hwprofiles, <root>/traces, <root>/models
    installed wheel                                   site-packages/sim/_bundled/hwprofiles, ...

`root()` is the folder that holds the three; a bundled file's name relative to it
(`hwprofiles/jetson.yaml`, `traces/toy`) is the same in both. Policy data
(`policies/data/*.yaml`) is inside the `policies` package in both layouts.

Nothing here depends on the working folder, nor on `sim.REPO_ROOT`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent  # the `sim` package
_WHEEL_ROOT = _PACKAGE / "_bundled"  # what an installed wheel holds
_CHECKOUT_ROOT = _PACKAGE.parent  # the source tree: sim/ beside hwprofiles/, traces/, models/

#: the bundled top-level folders, as named in the repository and in messages
NAMES = ("hwprofiles", "traces", "models")


def root() -> Path:
    """The folder holding `hwprofiles/`, `traces/` and `models/` (wheel or checkout)."""
    return _WHEEL_ROOT if _WHEEL_ROOT.is_dir() else _CHECKOUT_ROOT


def folder(name: str) -> Path:
    """The bundled folder `name` (one of NAMES); it may not exist (e.g. a wheel built without it)."""
    if name not in NAMES:
        raise ValueError(f"not a bundled folder: {name!r} (one of {', '.join(NAMES)})")
    return root() / name


def hwprofiles() -> Path:
    """`hwprofiles/`: the shipped hardware profiles (`*.yaml`) and their README."""
    return folder("hwprofiles")


def traces() -> Path:
    """`traces/`: the bundled traces (`traces/toy`)."""
    return folder("traces")


def models() -> Path:
    """`models/`: the bundled toy checkpoint (`models/toy-mixtral`)."""
    return folder("models")


def policy_data() -> Path:
    """`policies/data/`: published per-layer vectors (inside the `policies` package)."""
    spec = importlib.util.find_spec("policies")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve() / "data"
    return _CHECKOUT_ROOT / "policies" / "data"


def relative_name(path: Path | str) -> str | None:
    """`path` relative to `root()` (`hwprofiles/jetson.yaml` for a bundled profile, in either
    layout), or None when it lies outside."""
    try:
        return str(Path(path).resolve().relative_to(root().resolve()))
    except (ValueError, OSError):
        return None
