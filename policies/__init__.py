"""Policies: gating, prefetch, cache and placement, one policy per file, a registry each.

Policies decide; the engine acts. A policy never touches SimPy: it gets a read-only `Context`
(trace arrays, model sizes, hardware, a read-only view of the cache, a seeded rng) and returns
decisions, so the real-run backend can reuse the same objects unchanged. See `policies/base.py`.
"""

from policies.registry import CACHE, FAMILIES, GATING, PLACEMENT, PREFETCH

__all__ = ["CACHE", "FAMILIES", "GATING", "PLACEMENT", "PREFETCH"]
