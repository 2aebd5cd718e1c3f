"""The engine's elided-event link gives the same timeline as the naive SimPy loop with
`simpy.PriorityResource` and one process per load (per-layer LRU + pregate, top-k gating)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.naive import naive_decode
from sim.synthetic import random_trace
from tests.engine_helpers import config, hw, preset
from tests.test_engine_golden import _run


@pytest.mark.parametrize("channels,slots,seed", [(1, 10, 0), (2, 10, 1), (1, 24, 2), (3, 6, 3)])
def test_engine_matches_naive_simpy(channels, slots, seed):
    tr = random_trace(np.random.default_rng(seed), tokens=60, layers=4, experts=8, top_k=2, locality=0.4)
    pre = preset(4, 8, 2, hidden=2048, width=4096)
    h = hw(bw_Bps=5e9, latency_s=2e-5, channels=channels, mem_bw=2e11, overhead_s=5e-6)
    cfg = config(policy="mixtral_offloading", cache={"slots": slots})
    cfg.engine.prefill = False
    res, engine = _run(tr, h, cfg, pre)
    lat = naive_decode(tr, engine.cost, engine.cache_policy.sizes, channels)
    assert res.summary["prefetch_issued"] > 0 and res.summary["demand_loads_per_token"] > 0
    np.testing.assert_allclose(res.tokens["latency_s"].to_numpy(), lat, rtol=1e-9)
