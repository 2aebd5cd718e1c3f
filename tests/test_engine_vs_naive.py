"""The engine's elided-event link gives the same timeline as the naive SimPy loop with
`simpy.PriorityResource` and one process per load (per-layer LRU + pregate, top-k gating)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.engine.naive import naive_decode
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset
from tests.test_engine_golden import _run


@pytest.mark.parametrize("channels,slots,seed,shared,top_k,experts", [
    (1, 10, 0, False, 2, 8), (2, 10, 1, False, 2, 8), (1, 24, 2, False, 2, 8), (3, 6, 3, False, 2, 8),
    (1, 10, 4, True, 2, 8), (2, 8, 5, True, 2, 8), (3, 8, 6, True, 2, 8),
    # top-4: several loads per layer, so the engine looks ahead past a compute's start (CopyLink.history)
    (1, 16, 7, True, 4, 16), (2, 16, 8, True, 4, 16),
])
def test_engine_matches_naive_simpy(channels, slots, seed, shared, top_k, experts):
    """`shared`: copies share the device's memory bandwidth (unified memory) and slow compute."""
    tr = random_trace(np.random.default_rng(seed), tokens=60, layers=4, experts=experts, top_k=top_k, locality=0.4)
    pre = preset(4, experts, top_k, hidden=2048, width=4096)
    h = hw(bw_Bps=5e9, latency_s=2e-5, channels=channels, mem_bw=2e10 if shared else 2e11, overhead_s=5e-6,
           shared=shared)
    cfg = config(policy="mixtral_offloading", cache={"slots": slots})
    cfg.engine.prefill = False
    res, engine = _run(tr, h, cfg, pre)
    lat = naive_decode(tr, engine.cost, engine.cache_policy.sizes, channels)
    assert res.summary["prefetch_issued"] > 0 and res.summary["demand_loads_per_token"] > 0
    np.testing.assert_allclose(res.tokens["latency_s"].to_numpy(), lat, rtol=1e-9)
