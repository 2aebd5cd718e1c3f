"""A random engine-like protocol for checking a cache policy's victims against a reference ranking."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def check_victims_against_ranking(policy, ctx, trace, rank: Callable[[int, int, int], tuple], *,
                                  seed: int = 0) -> int:
    """Drive `policy` over `trace` as the engine would (a step's experts pinned, then loaded if
    absent; one random prefetch per step; loads that need 0.5-2 slots; loads landing at random
    later steps) and assert at every victims call that it names the evictable members of its one
    scope taken in order of `rank(key, t, layer)` until the room is freed (None if it cannot be).
    Returns how many calls were checked."""
    cache, eb, rng = ctx.cache, ctx.preset.expert_bytes, np.random.default_rng(seed)
    L, E = trace.model.layers, trace.model.experts
    flying, asked = [], 0
    for t in range(trace.num_tokens):
        for layer in range(L):
            for k in [k for k in flying if rng.random() < 0.5]:
                flying.remove(k)
                cache.finish_load(k)
            keys = [layer * E + int(e) for e in trace.experts[t, layer]]
            if policy.observes_steps:
                policy.on_step([t], layer)
            cache.pinned.update(keys)
            for key in keys + [int(rng.integers(0, L * E))]:  # the step's experts, then a prefetch
                if cache.state[key] != 0:
                    if key in keys and cache.state[key] == 2:
                        policy.on_access(key, t)
                    continue
                nbytes = eb * float(rng.choice([0.5, 1.0, 2.0]))
                got = policy.victims(key, nbytes, t, layer, key in keys)
                need = nbytes - cache.free_bytes()
                want: list[int] | None = []
                if need > 0:
                    want = []
                    for k in sorted((k for k in range(L * E) if cache.state[k] == 2 and cache.evictable(k)),
                                    key=lambda k: rank(k, t, layer)):
                        if need <= 0:
                            break
                        want.append(k)
                        need -= cache.size_bytes[k]
                    want = want if need <= 0 else None
                assert got == want, (t, layer, key, got, want)
                asked += 1
                if got is None:
                    continue
                for v in got:
                    cache.evict(v)
                    policy.on_evict(v)
                cache.begin_load(key, nbytes)
                policy.on_insert(key, t)
                if key in keys:
                    cache.finish_load(key)
                    policy.on_access(key, t)
                else:
                    flying.append(key)
            cache.pinned.clear()
    return asked
