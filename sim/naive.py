"""A deliberately naive SimPy simulator of the same decode semantics, for `bench` and cross-checks.

One SimPy process per load, a `simpy.PriorityResource` request/release per transfer, a timeout
per compute op (slowed, on a link that shares device memory bandwidth, by the copies holding the
link when it starts); per-layer LRU + `pregate` prefetch (depth 1) only. It is what one writes first;
`sim.engine` must give the same timeline (a test checks it) several times faster.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import simpy

from sim.cost import CostModel
from sim.trace import Trace


def naive_decode(trace: Trace, cost: CostModel, sizes: list[int], channels: int, count: int = 1,
                 staging_buffers: int = 6, max_tokens: int = 0) -> list[float]:
    """Per-token decode latencies (s): top-k gating, per-layer LRU of `sizes`, pregate depth 1."""
    env = simpy.Environment()
    link = simpy.PriorityResource(env, capacity=channels)
    L, E = trace.model.layers, trace.model.experts
    k = trace.model.top_k
    resident: list[OrderedDict] = [OrderedDict() for _ in range(L)]  # key -> None, LRU order
    loading: dict[int, simpy.Event] = {}  # key -> done event
    staging: set[int] = set()
    pred = np.argsort(-trace.pregate[1], axis=-1, kind="stable")[..., :k] if 1 in trace.pregate else None
    load_s = cost.load_s(cost.expert_bytes)
    lat: list[float] = []

    shared = cost.shared_link

    def bw_taken() -> float:
        """Memory bandwidth the copies holding the link take from compute (unified memory), else 0.
        A process started at this instant has not requested the link yet: on a shared link the
        loop first yields a zero timeout so that it has."""
        return link.count * cost.link_bandwidth_Bps if shared else 0.0

    def transfer(key: int, prio: int, done: simpy.Event, cached: bool):
        with link.request(priority=prio) as req:
            yield req
            yield env.timeout(load_s)
        loading.pop(key, None)
        if cached:
            resident[key // E][key] = "resident"
        done.succeed(env.now)

    def room(layer: int, pinned: set[int]) -> bool:
        od = resident[layer]
        if len(od) < sizes[layer]:
            return True
        for victim, st in od.items():
            if st == "resident" and victim not in pinned:
                del od[victim]
                return True
        return False

    def start(key: int, prio: int, pinned: set[int]) -> simpy.Event | None:
        layer = key // E
        done = env.event()
        cached = room(layer, pinned)
        if not cached:
            if prio == 1:
                return None
            staging.add(key)
        else:
            resident[layer][key] = "loading"
        loading[key] = done
        env.process(transfer(key, prio, done, cached))
        return done

    def main():
        decoded = 0
        for t in range(trace.num_tokens):
            if not trace.is_decode[t]:
                continue
            if max_tokens and decoded >= max_tokens:
                return
            decoded += 1
            t0 = env.now
            pos = int(trace.pos[t])
            for layer in range(L):
                if shared:
                    yield env.timeout(0)  # let transfers issued at this instant take the link first
                yield env.timeout(cost.attention_s(pos, 1, bw_taken()))
                keys = [layer * E + int(e) for e in trace.experts[t, layer]]
                pinned = set(keys)
                ready, waits = [], []
                for key in keys:
                    od = resident[layer]
                    if od.get(key) == "resident":
                        ready.append(key)
                    elif key in loading:
                        waits.append((key, loading[key]))
                    else:
                        waits.append((key, start(key, 0, pinned)))
                if pred is not None and layer + 1 < L:
                    n = 0
                    for e in pred[t, layer]:
                        pk = (layer + 1) * E + int(e)
                        if pk in resident[layer + 1] or pk in loading:
                            continue
                        start(pk, 1, pinned)
                        n += 1
                        if n == count:
                            break
                for key in ready:
                    if shared:
                        yield env.timeout(0)
                    yield env.timeout(cost.expert_compute_s(1, bw_taken_Bps=bw_taken()))
                    resident[layer].move_to_end(key)
                while waits:  # compute loaded experts in the order they arrive
                    yield env.any_of([ev for _, ev in waits])
                    arrived = sorted((w for w in waits if w[1].triggered), key=lambda w: w[1].value)
                    key, ev = arrived[0]
                    waits.remove((key, ev))
                    if shared:
                        yield env.timeout(0)
                    yield env.timeout(cost.expert_compute_s(1, bw_taken_Bps=bw_taken()))
                    if key in staging:
                        staging.discard(key)
                    elif key in resident[layer]:
                        resident[layer].move_to_end(key)
            lat.append(env.now - t0)

    env.process(main())
    env.run()
    return lat
