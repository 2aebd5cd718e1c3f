"""A deliberately naive SimPy simulator of the same decode semantics, for `bench` and cross-checks.

One SimPy process per load, a `simpy.PriorityResource` request/release per transfer, a timeout
per compute op; per-layer LRU + `pregate` prefetch (depth 1) only. It is what one writes first;
`sim.engine.engine` must give the same timeline (a test checks it) several times faster.

On a link that shares the device's memory bandwidth, memory contention is simulated the direct
way: a transfer announces when its body (after the latency) starts and ends on a shared bus
object, and a compute op re-rates its remaining bytes at every such change
(`sim/machine/contention.py` states the model; the engine computes the same thing from the link's
copy bodies without events).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import simpy

from sim.machine.cost import N_ATTN_KERNELS, N_EXPERT_KERNELS, CostModel
from sim.trace.format import Trace


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
    lat: list[float] = []
    shared = cost.shared_link
    dev = cost.device
    bus = {"copies": 0, "changed": env.event()}  # copy bodies in flight; fires at each change

    def bus_change(delta: int) -> None:
        bus["copies"] += delta
        ev, bus["changed"] = bus["changed"], env.event()
        ev.succeed()

    def compute(nbytes: float, flops: float, kernels: int):
        """One device op: its overhead, then its bytes at the bandwidth the copies leave."""
        if not shared:
            yield env.timeout(dev.op_s(nbytes, flops, kernels))
            return
        yield env.timeout(kernels * dev.kernel_overhead_s)
        min_end = env.now + flops / dev.matmul_flops
        left = nbytes
        while left > 0.0:
            rate = max(dev.memory_bandwidth_Bps - bus["copies"] * cost.link_bandwidth_Bps,
                       0.1 * dev.memory_bandwidth_Bps)
            t0, eta = env.now, env.timeout(left / rate)
            yield eta | bus["changed"]
            if eta.processed:  # (a Timeout is `triggered` from birth: it is scheduled at once)
                break
            left -= (env.now - t0) * rate
        if env.now < min_end:
            yield env.timeout(min_end - env.now)

    def attention(pos: int):
        return compute(*cost._attention_work(pos, 1), N_ATTN_KERNELS)

    def expert():
        return compute(cost.expert_bytes, cost.preset.expert_flops_per_token, N_EXPERT_KERNELS)

    def transfer(key: int, prio: int, done: simpy.Event, cached: bool):
        with link.request(priority=prio) as req:
            yield req
            yield env.timeout(cost.link_latency_s)
            if shared:
                bus_change(+1)
            yield env.timeout(cost.expert_bytes / cost.link_bandwidth_Bps)
            if shared:
                bus_change(-1)
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
                yield env.process(attention(pos))
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
                    yield env.process(expert())
                    resident[layer].move_to_end(key)
                while waits:  # compute loaded experts in the order they arrive
                    yield env.any_of([ev for _, ev in waits])
                    arrived = sorted((w for w in waits if w[1].triggered), key=lambda w: w[1].value)
                    key, ev = arrived[0]
                    waits.remove((key, ev))
                    yield env.process(expert())
                    if key in staging:
                        staging.discard(key)
                    elif key in resident[layer]:
                        resident[layer].move_to_end(key)
            lat.append(env.now - t0)

    env.process(main())
    env.run()
    return lat
