"""Engine bugs found by review, each kept fixed by the smallest case that showed it."""

from __future__ import annotations

import numpy as np
import pytest

from sim.runner import simulate
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset


@pytest.mark.parametrize("machine_seed", [14])
def test_a_batched_step_whose_last_loads_arrived_meanwhile_does_not_pop_an_empty_list(machine_seed):
    # serving, lfu over 12 slots, pregate: every key still to load had arrived by the time it was
    # reached, so nothing was outstanding (was: IndexError: pop from empty list)
    tr = random_trace(np.random.default_rng(machine_seed), tokens=12, layers=3, experts=8, top_k=2, prefill=5,
                      sequences=3, locality=0.5)
    cfg = config(cache={"name": "lfu", "slots": 12}, prefetch={"name": "pregate"})
    cfg.workload.kind, cfg.workload.users = "closed", 3
    s = simulate(cfg, tr, hw(channels=2), preset=preset(3, 8, 2)).summary
    assert s["requests"] == 3


def test_a_batched_step_never_takes_the_staging_buffers_staged_prefetches_hold():
    # serving with AdapMoE's staged prefetches (admit=on_use) and a cache too small to give the
    # step's loads slots: the step's staging loads and the prefetches' together stay within the buffers
    for seed in range(4):
        tr = random_trace(np.random.default_rng(seed), tokens=10, layers=3, experts=16, top_k=2, prefill=4,
                          sequences=4, locality=0.3)
        cfg = config(cache={"name": "lru", "scope": "global", "slots": 4},
                     prefetch={"name": "pregate", "admit": "on_use", "count": 3, "depth": 2, "wait": True})
        cfg.workload.kind, cfg.workload.users = "closed", 4
        s = simulate(cfg, tr, hw(channels=2), preset=preset(3, 16, 2)).summary
        assert s["requests"] == 4 and s["prefetch_issued"] > 0
