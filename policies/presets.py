"""Named policy presets: a gating, prefetch, cache and placement choice with knobs.

`policy=NAME` selects one; `gating.*`, `prefetch.*`, `cache.*`, `placement.*` override it.
`sensitivity: published` uses the shipped vector for the model preset (AdapMoE's Mixtral-8x7B);
override with `gating.sensitivity=trace` for a trace with its own sensitivities.
"""

from __future__ import annotations

from typing import Any

from sim.errors import UserError

TOPK = {"name": "topk"}
LOAD = {"name": "load"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # the model's own routing, no prefetch, one global LRU cache
    "baseline": {"gating": TOPK, "prefetch": {"name": "none"}, "cache": {"name": "lru", "scope": "global"},
                 "placement": LOAD},
    "lfu": {"gating": TOPK, "prefetch": {"name": "none"}, "cache": {"name": "lfu", "scope": "global"},
            "placement": LOAD},
    # mixtral-offloading: per-layer LRU + speculative next-layer loading from pre-gating
    "mixtral_offloading": {"gating": TOPK, "prefetch": {"name": "pregate", "depth": 1, "count": 1},
                           "cache": {"name": "lru", "scope": "layer"}, "placement": LOAD},
    # AdapMoE as released: adaptive gating + pregate (staged, waited for) + DP-sized per-layer caches
    "adapmoe": {
        "gating": {"name": "adapmoe", "T": 0.005, "sensitivity": "trace"},
        "prefetch": {"name": "pregate", "depth": 1, "count": 1, "wait": True, "admit": "on_use"},
        "cache": {"name": "adapmoe_dp", "fit": "trace"},
        "placement": LOAD,
    },
    # Fiddler: the most used experts pinned on the device, missed experts computed on the CPU
    "fiddler": {"gating": TOPK, "prefetch": {"name": "none"}, "cache": {"name": "static"},
                "placement": {"name": "cpu_on_miss"}},
    # HOBBIT: per-layer LRU, low-precision copies of missed low-weight experts
    "hobbit": {"gating": TOPK, "prefetch": {"name": "none"}, "cache": {"name": "lru", "scope": "layer"},
               "placement": {"name": "low_precision_on_miss", "w_max": 0.3, "low_bits": 1.0}},
    # ours: AdapMoE whose prefetches never delay a demand load (issued only onto an idle channel, in
    # chunks that yield to demand loads), whose gating spends the loss budget on missing experts, and
    # whose per-layer caches keep the most used experts (LFU; AdapMoE's DP sizes lost 1.6-7%)
    "adapmoe_yield": {
        "gating": {"name": "adapmoe_cache_aware", "T_miss": 0.006, "T_hit": 0.0, "sensitivity": "trace"},
        "prefetch": {"name": "pregate", "depth": 1, "count": 1, "wait": False, "admit": "on_use",
                     "yield_to_demand": True, "chunks": 16, "idle_only": True},
        "cache": {"name": "lfu", "scope": "layer"},
        "placement": LOAD,
    },
    # the best offline schedule we know for a cache size (reads the future; not a bound: the lower
    # bound is `bound=true`): exact MIN's loads, each prefetched as early as its victim allows
    "oracle": {"gating": TOPK, "prefetch": {"name": "oracle"}, "cache": {"name": "belady"},
               "placement": LOAD},
}


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise UserError(f"unknown policy preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
