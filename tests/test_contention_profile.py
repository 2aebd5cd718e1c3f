"""The memory-bandwidth profile that copies leave to compute (`sim.machine.contention.MemoryBus`):
extended as the link appends copies, it must answer every query as a profile rebuilt from the
link's whole schedule does, however far ahead the copies are queued."""

from __future__ import annotations

import numpy as np
import pytest

from sim.engine.link import CopyLink
from sim.engine.transfer import DEMAND, PREFETCH
from sim.machine.contention import MemoryBus
from sim.machine.cost import OpWork

MEMORY_BPS, LINK_BPS = 200e9, 32e9


def _rebuilt_op_s(bus: MemoryBus, work: OpWork, start_s: float) -> float:
    """The same query on a profile rebuilt from the link's schedule at this moment."""
    bus.stale = True
    return bus.op_s(work, start_s)


@pytest.mark.parametrize("seed", range(20))
def test_extended_profile_equals_rebuilt(seed):
    rng = np.random.default_rng(seed)
    link = CopyLink("test", LINK_BPS, 5e-6, 1, keep_history=True)
    bus = MemoryBus(MEMORY_BPS, LINK_BPS, link)
    twin = CopyLink("twin", LINK_BPS, 5e-6, 1, keep_history=True)
    ref = MemoryBus(MEMORY_BPS, LINK_BPS, twin)
    now = 0.0
    work = OpWork(2e-5, 60e6, 1e-5)
    for _ in range(60):
        # a burst of copies (up to 50 queued at once: far more than the profile keeps behind its queries)
        for _ in range(int(rng.integers(0, 50 if rng.random() < 0.1 else 3))):
            prio = DEMAND if rng.random() < 0.5 else PREFETCH
            nbytes = float(rng.uniform(1e6, 70e6))
            for lk in (link, twin):
                lk.submit(0, nbytes, prio, now)
        for _ in range(int(rng.integers(1, 4))):
            got, want = bus.op_s(work, now), _rebuilt_op_s(ref, work, now)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (now, got, want)
            now += got
        for lk in (link, twin):
            if lk.running_heap and lk.running_heap[0][0] <= now:
                lk.advance(now)
        now += float(rng.uniform(0.0, 2e-3))


def test_many_copies_queued_ahead_of_the_queries():
    """40 copies queued at once on one channel: an op an hour later of simulated copies still
    sees each of them (a profile that forgot change points ahead of its queries would not)."""
    link = CopyLink("test", LINK_BPS, 0.0, 1, keep_history=True)
    bus = MemoryBus(MEMORY_BPS, LINK_BPS, link)
    work = OpWork(0.0, 1e6, 0.0)
    bus.op_s(work, 0.0)  # valid from here on: the submits below extend it
    for _ in range(40):
        link.submit(0, 32e6, PREFETCH, 0.0)  # 1 ms each, back to back: 40 ms of copies
    for t_s in (0.5e-3, 10.5e-3, 39.5e-3):
        assert bus.op_s(work, t_s) == pytest.approx(1e6 / (MEMORY_BPS - LINK_BPS), rel=1e-12)
    assert bus.op_s(work, 41e-3) == pytest.approx(1e6 / MEMORY_BPS, rel=1e-12)
