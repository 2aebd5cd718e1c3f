"""Published per-layer vectors shipped with the project (`policies/data/*.yaml`), and S_l lookup.

`sensitivity` knobs accept: `trace` (the trace's `meta.yaml: sensitivity.S_l`), `published` (the
shipped vector for the model preset, e.g. AdapMoE's Mixtral-8x7B values), or a path to a YAML /
JSON file holding a list or a mapping with `S_l`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from sim import bundled
from sim.errors import UserError

DATA = bundled.policy_data()  # policies/data/, shipped as package data in a wheel


def has_published(kind: str, model: str) -> bool:
    """Whether `<kind>-<model>.yaml` is shipped (a policy that can do without it says what it
    assumes instead: `policies/prefetch/pregate.py`, `prefetch.accuracy=auto`)."""
    return (DATA / f"{kind}-{model}.yaml").is_file()


def published(kind: str, model: str) -> dict:
    """The shipped file `<kind>-<model>.yaml` (kind: sensitivity, adapmoe). UserError when it is not
    shipped: a value asked for as `published` is never replaced by another model's."""
    path = DATA / f"{kind}-{model}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in DATA.glob(f"{kind}-*.yaml"))
        raise UserError(f"no published {kind} data for model {model!r}; shipped: {', '.join(have) or 'none'}")
    return yaml.safe_load(path.read_text())


def sensitivities_or_none(spec: str, ctx) -> np.ndarray:
    """`sensitivities(spec, ctx)`, or zeros for `spec="none"` (a policy asked to estimate no dL)."""
    return np.zeros(ctx.layers) if spec == "none" else sensitivities(spec, ctx)


def sensitivities(spec: str, ctx) -> np.ndarray:
    """Per-layer S_l [L] from `trace`, `published` or a file (see module docstring)."""
    L = ctx.layers
    if spec == "trace":
        s = ctx.trace.sensitivity
        if s is None:
            raise UserError("this trace has no sensitivities (meta.yaml sensitivity.S_l); "
                            "use gating.sensitivity=published or gating.sensitivity=FILE")
    elif spec == "published":
        s = published("sensitivity", ctx.preset.name)["S_l"]
    else:
        from sim.errors import read_text

        path = Path(spec)
        if not path.is_file():
            raise UserError(f"sensitivity file not found: {spec} (or use 'trace' / 'published')")
        text = read_text(path, "sensitivity file")
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            raise UserError(f"sensitivity file {spec} does not parse: {str(err).splitlines()[0]}") from None
        s = data.get("S_l") if isinstance(data, dict) else data
    try:
        arr = np.asarray(s, dtype=np.float64) if s is not None else np.zeros(0)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"sensitivities must be {L} numbers >= 0 (one per layer), got {str(s)[:60]!r}") from None
    if arr.shape != (L,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise UserError(f"sensitivities must be {L} finite values >= 0 (one per layer), got shape {arr.shape}")
    return arr
