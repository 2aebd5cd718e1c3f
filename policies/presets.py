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
        "gating": {"name": "adapmoe", "sensitivity": "trace"},  # T solved for a 0.25 single-expert share
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
    # ours, 2026: adapmoe_yield whose missed experts are split per step between loading and the CPU
    # (HybriMoE's rule; on a desktop CPU every miss runs there), the gating's loss budget tuned for it
    # (T_miss chosen on the fit half of the real Mixtral routing; docs/policies-2026.md). Needs experts
    # in host memory (a profile whose experts stream from storage refuses it: use adapmoe_yield there)
    "hybrid_yield": {
        "gating": {"name": "adapmoe_cache_aware", "T_miss": 0.005, "T_hit": 0.0, "sensitivity": "trace"},
        "prefetch": {"name": "pregate", "depth": 1, "count": 1, "wait": False, "admit": "on_use",
                     "yield_to_demand": True, "chunks": 16, "idle_only": True},
        "cache": {"name": "lfu", "scope": "layer"},
        "placement": {"name": "hybrid_split"},
    },
    # the best offline schedule we know for a cache size (reads the future; not a bound: the lower
    # bound is `bound=true`): exact MIN's loads, each prefetched as early as its victim allows
    "oracle": {"gating": TOPK, "prefetch": {"name": "oracle"}, "cache": {"name": "belady"},
               "placement": LOAD},
}


SECTIONS = ("gating", "prefetch", "cache", "placement")


def register_preset(name: str, sections: dict[str, dict[str, Any]]) -> None:
    """Add the policy preset `name` (for plug-ins: call it when the plug-in module is imported).

    `sections` maps each of `gating`, `prefetch`, `cache` and `placement` to its section, a dict
    with the policy's `name` and any knobs, as in `PRESETS` above:

        register_preset("random_lru", {"gating": {"name": "topk"}, "prefetch": {"name": "none"},
                                       "cache": {"name": "random_evict"}, "placement": {"name": "load"}})

    The policies are looked up when a run uses the preset (so they may be registered after it).
    UserError: a name that exists (a plug-in cannot replace a preset), a section missing or unknown,
    a section without `name`.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"a policy preset's name must be a non-empty string, got {name!r}")
    if name in PRESETS:
        if PRESETS[name] == sections:  # the same module imported again
            return
        raise UserError(f"policy preset {name!r} already exists: a plug-in cannot replace it; pick another name")
    if not isinstance(sections, dict):
        raise UserError(f"policy preset {name!r}: sections must be a dict of {', '.join(SECTIONS)}")
    unknown = sorted(set(sections) - set(SECTIONS))
    missing = [s for s in SECTIONS if s not in sections]
    if unknown or missing:
        what = f"unknown section(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise UserError(f"policy preset {name!r}: {what} (a preset sets each of {', '.join(SECTIONS)})")
    for sec in SECTIONS:
        if not isinstance(sections[sec], dict) or "name" not in sections[sec]:
            raise UserError(f"policy preset {name!r}: section {sec} must be a dict with a 'name'")
    PRESETS[name] = {sec: dict(sections[sec]) for sec in SECTIONS}


def preset_names() -> list[str]:
    """Every preset, the installed plug-ins' included."""
    from policies.registry import load_entry_points

    load_entry_points()
    return sorted(PRESETS)


def get_preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        known = preset_names()  # loads the entry-point plug-ins, which may add presets
        if name not in PRESETS:
            raise UserError(f"unknown policy preset {name!r}; known: {', '.join(known)}")
    return PRESETS[name]
