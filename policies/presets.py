"""Named policy presets: a gating, prefetch, cache and placement choice with knobs.

`policy=NAME` selects one; `gating.*`, `prefetch.*`, `cache.*`, `placement.*` override it.
"""

from __future__ import annotations

from typing import Any

from sim.errors import UserError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # the model's own routing, no prefetch, one global LRU cache
    "baseline": {
        "gating": {"name": "topk"},
        "prefetch": {"name": "none"},
        "cache": {"name": "lru", "scope": "global"},
        "placement": {"name": "load"},
    },
    # mixtral-offloading: per-layer LRU + speculative next-layer loading from pre-gating
    "mixtral_offloading": {
        "gating": {"name": "topk"},
        "prefetch": {"name": "pregate", "depth": 1, "count": 1},
        "cache": {"name": "lru", "scope": "layer"},
        "placement": {"name": "load"},
    },
    "lfu": {
        "gating": {"name": "topk"},
        "prefetch": {"name": "none"},
        "cache": {"name": "lfu", "scope": "global"},
        "placement": {"name": "load"},
    },
}


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise UserError(f"unknown policy preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
