"""Memory tiers (docs/tiers.md): storage -> host cache -> device.

- a hand-computed timeline of reads and copies, whole and pipelined, and of a host hit;
- with the host cache off, the run is the storage-direct run it always was;
- a host cache that holds every expert from the start is a run with experts in host memory;
- the fast machine and the SimPy machine give the same timeline and per-tier figures on random
  tiered configurations (every preset, host policies, pipelining, prefetch into host or device);
- physics: a faster storage hop never slows a demand-only run; host LRU hits never fall as it grows;
- CPU placement reads an expert into host memory first; `prefetch.into=host` fills host memory;
- bad inputs: one line naming the field, exit 2, nothing written.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.presets import PRESETS
from sim.errors import UserError
from sim.machine.hardware import LinkSpec
from sim.runner import build_engine, simulate
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, preset, trace
from tests.test_machines import COUNTERS, KNOBS
from tests.tier_helpers import tiered_hw


def _cfg(policy="baseline", slots=1, host=None, pipelined=False, chunks=8, into=None, **sections):
    cfg = config(policy=policy, cache={"slots": slots, **sections.pop("cache", {})}, **sections)
    cfg.engine = dataclasses.replace(cfg.engine, prefill=False, timeline_tokens=10**6)
    if host is not None:
        cfg.host_cache.slots = host
    cfg.tiers.pipelined, cfg.tiers.chunks = pipelined, chunks
    if into is not None:
        cfg.prefetch = {**cfg.prefetch, "into": into}
    return cfg


def _sim(cfg, tr, h, pre, machine="fast"):
    engine, info = build_engine(cfg, tr, h, pre, machine=machine)
    return simulate(cfg, engine=engine, info=info)


def _rows(res, lane):
    return res.events.filter(res.events["lane"] == lane).sort("start_s")


# ------------------------------------------------------------------ golden timeline
@pytest.mark.parametrize("pipelined", [False, True])
def test_reads_then_copies_by_hand(pipelined):
    """1 layer, 2 experts, top-1; device cache 1 slot, host cache 2; tokens route 0, 1, 0. Token 0
    and 1 read their expert (1 GB/s) then copy it (4 GB/s); token 2 finds expert 0 in host memory."""
    pre = preset(1, 2, 1, hidden=512, width=1024)
    B = pre.expert_bytes
    h = tiered_hw(read_Bps=1e9, copy_Bps=4e9)
    res = _sim(_cfg(host=2, pipelined=pipelined, chunks=4), trace([[[0]], [[1]], [[0]]], 1, 2), h, pre)
    reads, copies = _rows(res, "storage_to_host"), _rows(res, "host_to_device")
    assert reads.height == 2 and copies.height == 3
    for i in range(2):  # a read starts when its load is issued, at its token's gate time
        r, c = reads.row(i, named=True), copies.row(i, named=True)
        assert r["start_s"] == c["issued_s"] and r["end_s"] == pytest.approx(r["start_s"] + B / 1e9, rel=1e-12)
        if pipelined:  # the copy starts once the first of 4 chunks is read; ends a chunk's copy after the read
            assert c["start_s"] == pytest.approx(r["start_s"] + B / 4 / 1e9, rel=1e-12)
            assert c["end_s"] == pytest.approx(r["end_s"] + B / 4 / 4e9, rel=1e-12)
        else:
            assert c["start_s"] == pytest.approx(r["end_s"], rel=1e-12)
            assert c["end_s"] == pytest.approx(r["end_s"] + B / 4e9, rel=1e-12)
    hit = copies.row(2, named=True)  # token 2: a host hit, a copy only
    assert hit["start_s"] == hit["issued_s"] and hit["end_s"] == pytest.approx(hit["start_s"] + B / 4e9, rel=1e-12)
    s = res.summary
    assert s["host_reads"] == 2 and s["host_cache_accesses"] == 3 and s["host_cache_hit_rate"] == pytest.approx(1 / 3)
    assert s["bytes_per_token_storage_to_host"] == pytest.approx(2 * B / 3)
    assert s["bytes_per_token_host_to_device"] == pytest.approx(B)
    # every stall is a wait for a load: the storage part is the wait while the expert was still being read
    stall = s["stall_s_per_token"]
    assert s["stall_s_per_token_storage_to_host"] + s["stall_s_per_token_host_to_device"] == pytest.approx(stall)
    assert s["stall_s_per_token_storage_to_host"] == pytest.approx(
        (reads["end_s"] - reads["start_s"]).sum() / 3 if not pipelined
        else (reads["end_s"] - copies["issued_s"].head(2)).sum() / 3, rel=1e-9)
    # a host cache of one slot: expert 1's read evicts expert 0, which token 2 reads again
    small = _sim(_cfg(host=1), trace([[[0]], [[1]], [[0]]], 1, 2), h, pre)
    assert small.summary["host_reads"] == 3 and small.summary["host_cache_evictions"] == 2


# ------------------------------------------------------------------ equal to the runs it replaces
def _scenario(rng):
    layers, experts = int(rng.integers(1, 5)), int(rng.integers(2, 9))
    k = int(rng.integers(1, min(3, experts) + 1))
    tr = random_trace(rng, tokens=int(rng.integers(1, 10)), layers=layers, experts=experts, top_k=k,
                      prefill=int(rng.integers(0, 5)), sequences=int(rng.integers(1, 3)),
                      locality=float(rng.uniform(0, 0.9)))
    h = tiered_hw(read_Bps=float(rng.choice([2e8, 1e9, 5e9])), copy_Bps=float(rng.choice([1e9, 5e9, 3e10])),
                  read_latency_s=float(rng.choice([0.0, 5e-5])), copy_latency_s=float(rng.choice([0.0, 1e-5])),
                  read_channels=int(rng.integers(1, 3)), copy_channels=int(rng.integers(1, 3)))
    name = str(rng.choice(sorted(PRESETS)))
    cfg = config(policy=name, cache={"slots": int(rng.integers(k, layers * experts + 1))}, **KNOBS.get(name, {}))
    cfg.engine = dataclasses.replace(cfg.engine, pipelining=bool(rng.random() < 0.5), prefill=bool(rng.random() < 0.5),
                                     staging_buffers=max(6, k), timeline_tokens=10**6)
    cfg.host_cache.name = str(rng.choice(["lru", "lfu", "static", "belady"]))
    cfg.host_cache.slots = int(rng.integers(0, layers * experts + 1))
    cfg.tiers.pipelined, cfg.tiers.chunks = bool(rng.random() < 0.5), int(rng.choice([1, 3, 8]))
    if cfg.host_cache.slots and rng.random() < 0.4:
        cfg.prefetch = {**cfg.prefetch, "into": "host"}
    return cfg, tr, h, preset(layers, experts, k, hidden=512, width=1024)


TIER_KEYS = ("host_", "bytes_per_token_", "stall_s_per_token_", "link_utilization_")


def _same(a, b) -> None:
    np.testing.assert_allclose(a.tokens["latency_s"].to_numpy(), b.tokens["latency_s"].to_numpy(), rtol=1e-9,
                               atol=1e-15)
    assert a.summary.keys() == b.summary.keys()
    for key in COUNTERS:
        assert a.summary[key] == b.summary[key], (key, a.summary[key], b.summary[key])
    for key, x in a.summary.items():
        if key.startswith(TIER_KEYS) or key in ("tpot_mean_s", "ttft_s", "stall_s_per_token", "bytes_loaded_per_token"):
            y = b.summary[key]
            assert x == pytest.approx(y, rel=1e-9, abs=1e-15, nan_ok=True), (key, x, y)
    for lane in ("link", "storage_to_host", "host_to_device"):
        ea, eb = (r.events.filter(r.events["lane"] == lane).sort(["issued_s", "layer", "expert"]) for r in (a, b))
        assert ea.height == eb.height, lane
        for col in ("issued_s", "start_s", "end_s"):
            np.testing.assert_allclose(ea[col].to_numpy(), eb[col].to_numpy(), rtol=1e-9, atol=1e-15, err_msg=lane)


def _both(seed: int):
    rng = np.random.default_rng(seed)
    cfg, tr, h, pre = _scenario(rng)
    try:
        return [_sim(cfg, tr, h, pre, machine) for machine in ("fast", "events")]
    except UserError:  # (a cache too small for a policy's needs, a policy the combination refuses)
        return None


@pytest.mark.parametrize("seed", range(40))
def test_the_event_machine_gives_the_fast_machines_tiered_run(seed):
    runs = _both(seed)
    if runs is not None:
        _same(*runs)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40, 1040))
def test_the_event_machine_gives_the_fast_machines_tiered_run_many(seed):
    runs = _both(seed)
    if runs is not None:
        _same(*runs)


@pytest.mark.parametrize("seed", range(12))
def test_host_cache_off_is_the_storage_direct_run(seed):
    """`host_cache.slots=0`: the profile's storage_to_device link, exactly as a profile without hops."""
    cfg, tr, h, pre = _scenario(np.random.default_rng(seed))
    cfg.host_cache.slots = 0
    cfg.tiers.pipelined = False  # (refused without a host tier)
    cfg.prefetch = {k: v for k, v in cfg.prefetch.items() if k != "into"}
    direct = dataclasses.replace(h, links={"storage_to_device": h.links["storage_to_device"]},
                                 host_memory_reserve_bytes=None)
    try:
        a = _sim(cfg, tr, h, pre)
    except UserError:
        return
    b = _sim(dataclasses.replace(cfg, host_cache=type(cfg.host_cache)()), tr, direct, pre)  # nothing asked
    assert "host_cache_slots" not in a.summary
    assert a.summary["host_cache_from"] == "host_cache off (storage_to_device)"
    assert b.summary["host_cache_from"].startswith("no host tier")
    drop = {"host_cache_from"}
    assert {k: v for k, v in a.summary.items() if k not in drop} == {k: v for k, v in b.summary.items() if k not in drop}


@pytest.mark.parametrize("seed", range(12))
def test_a_host_cache_of_every_expert_is_experts_in_host_memory(seed):
    """host_cache.name=static with every expert: nothing is ever read, and the run is the one with
    experts in host memory over the same host_to_device link."""
    cfg, tr, h, pre = _scenario(np.random.default_rng(seed))
    cfg.host_cache.name, cfg.host_cache.slots = "static", pre.layers * pre.experts
    cfg.prefetch = {k: v for k, v in cfg.prefetch.items() if k != "into"}
    host = dataclasses.replace(h, expert_tier="host", links={"host_to_device": h.links["host_to_device"]})
    try:
        a = _sim(cfg, tr, h, pre)
    except UserError:
        return
    b = _sim(dataclasses.replace(cfg, host_cache=type(cfg.host_cache)(), tiers=type(cfg.tiers)()), tr, host, pre)
    assert a.summary["host_reads"] == 0
    for key, x in b.summary.items():
        assert a.summary[key] == x or key in ("in_sample_fit",), (key, a.summary[key], x)
    np.testing.assert_array_equal(a.tokens["latency_s"].to_numpy(), b.tokens["latency_s"].to_numpy())


# ------------------------------------------------------------------ physics
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), faster=st.sampled_from([1.5, 2.0, 10.0]), host=st.integers(1, 12))
def test_a_faster_storage_hop_never_slows_a_demand_only_run(seed, faster, host):
    """Top-1 (with more, loads are computed, and so touched in LRU order, as they arrive: the
    device's misses may then depend on timing), a stateless gating, no prefetch."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, tokens=8, layers=3, experts=8, top_k=1, locality=0.5)
    pre = preset(3, 8, 1, hidden=512, width=1024)
    cfg = _cfg(slots=int(rng.integers(1, 12)), host=host, pipelined=bool(rng.random() < 0.5))
    slow = tiered_hw(read_Bps=1e9, copy_Bps=4e9, read_latency_s=1e-5, read_channels=int(rng.integers(1, 3)))
    fast = dataclasses.replace(slow, links={**slow.links, "storage_to_host": dataclasses.replace(
        slow.links["storage_to_host"], bandwidth_Bps=1e9 * faster)})
    a, b = _sim(cfg, tr, slow, pre), _sim(cfg, tr, fast, pre)
    assert (b.tokens["end_s"].to_numpy() <= a.tokens["end_s"].to_numpy() * (1 + 1e-12)).all()
    assert a.summary["host_cache_hit_rate"] == b.summary["host_cache_hit_rate"]  # the same misses


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20))
def test_host_lru_hits_never_fall_as_it_grows(seed):
    """Demand-only, top-1, a stateless gating: the device's misses do not depend on timing (with
    top-k > 1 they may: loads are computed, and so touched in LRU order, as they arrive), and LRU
    is a stack algorithm, so a larger host cache hits at least as often (and reads no more)."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, tokens=12, layers=2, experts=8, top_k=1, locality=0.6)
    pre = preset(2, 8, 1, hidden=512, width=1024)
    h = tiered_hw()
    hits = [_sim(_cfg(slots=2, host=n), tr, h, pre).summary for n in range(1, 17)]
    for small, big in zip(hits, hits[1:], strict=False):
        assert big["host_cache_accesses"] == small["host_cache_accesses"]
        assert big["host_reads"] <= small["host_reads"]


# ------------------------------------------------------------------ placement and prefetch across tiers
def test_cpu_placement_reads_into_host_first():
    """fiddler: the device's one static slot holds expert 2; expert 1 runs on the CPU twice: read
    into host memory for the first job (which waits for the read), found there by the second."""
    pre = preset(1, 4, 1, hidden=512, width=1024)
    h = tiered_hw(read_Bps=1e9)
    tr = trace([[[1]], [[1]], [[2]], [[2]], [[2]]], 1, 4)
    res = _sim(_cfg(policy="fiddler", host=4), tr, h, pre)
    s = res.summary
    assert s["host_reads"] == 1 and s["host_cache_accesses"] == 2 and s["host_cache_hit_rate"] == 0.5
    assert res.tokens["cpu_wait_s"][0] >= pre.expert_bytes / 1e9
    every = _sim(dataclasses.replace(_cfg(policy="fiddler", host=4), host_cache=dataclasses.replace(
        _cfg().host_cache, name="static", slots=4)), tr, h, pre)
    assert every.summary["host_reads"] == 0 and every.tokens["cpu_wait_s"].sum() < res.tokens["cpu_wait_s"].sum()


def test_prefetch_into_host_reads_ahead_and_the_device_copies_from_host():
    """A perfect pre-gate one layer ahead: with prefetch.into=host, layer 0 reads layer 1's expert
    into host memory and layer 1's demand load follows that read (or finds it in host), so every
    expert is read once and no prefetch reaches the device."""
    ids = [[[0], [1]], [[2], [3]], [[0], [1]]]  # [T][L][k]
    E = 4
    pregate = np.full((3, 2, E), -10.0, np.float32)  # [T, L, E]: layer l's prediction of layer l + 1
    for t, row in enumerate(ids):
        pregate[t, 0, row[1][0]] = 10.0
    tr = trace(ids, 2, E, pregate={1: pregate})
    pre = preset(2, E, 1, hidden=512, width=1024)
    h = tiered_hw(read_Bps=1e9, copy_Bps=8e9)
    res = _sim(_cfg(policy="baseline", slots=2, host=8, into="host", prefetch={"name": "pregate", "depth": 1,
                                                                              "count": 1}), tr, h, pre)
    s = res.summary
    assert s["prefetch_issued"] == 0 and s["host_prefetches"] == 2  # layer 1's experts 1 and 3 (then in host)
    assert s["host_reads"] == 4  # 0, 1, 2, 3 once each: layer 1's loads follow the prefetched reads
    # six device loads; only layer 0's first two find their expert neither in host memory nor being read
    assert s["host_cache_accesses"] == 6
    assert s["host_cache_hit_rate"] + s["host_cache_late_share"] == pytest.approx(4 / 6)


# ------------------------------------------------------------------ bad inputs
def _cli(capsys, args, tmp_path):
    from sim.cli import main

    out = tmp_path / "never"
    rc = main(["run", "trace=toy", f"out={out}", *args])
    err = capsys.readouterr().err
    return rc, err, out


@pytest.mark.parametrize("args,needle", [
    (["hw=desktop-nvme.yaml", "quant.bits=16", "host_cache.bytes=1e12"], "exceed"),
    (["hw=desktop-nvme.yaml", "host_cache.slots=3", "host_cache.bytes=1e9"], "not both"),
    (["hw=jetson.yaml", "host_cache.slots=8"], "unified memory"),
    (["hw=rtx4090.yaml", "host_cache.slots=8"], "expert_tier: host"),
    (["hw=desktop-nvme.yaml", "host_cache.name=nope"], "host_cache.name"),
    (["hw=desktop-nvme.yaml", "quant.bits=16", "prefetch.into=gpu"], "prefetch.into"),
    (["hw=rtx4090.yaml", "prefetch.into=host"], "prefetch.into=host needs a host cache"),
    (["hw=desktop-nvme.yaml", "quant.bits=16", "oracle=true"], "oracle=true"),
    (["hw=desktop-nvme.yaml", "quant.bits=16", "tiers.chunks=0"], "tiers.chunks"),
    (["hw=desktop-nvme.yaml", "host_cache.slots=-1"], "host_cache.slots"),
])
def test_bad_tier_inputs(capsys, tmp_path, args, needle):
    rc, err, out = _cli(capsys, args, tmp_path)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_a_host_cache_asked_of_a_profile_without_the_hop(capsys, tmp_path):
    """A hierarchy with no path from storage to the device through host memory: the missing link named."""
    from sim.machine.hardware import PROFILES_DIR

    text = (PROFILES_DIR / "desktop-nvme.yaml").read_text()
    start = text.index("  storage_to_host:")
    end = text.index("  host_to_device:")
    bad = tmp_path / "nohop.yaml"
    bad.write_text(text[:start] + text[end:])
    rc, err, out = _cli(capsys, [f"hw={bad}", "host_cache.slots=8"], tmp_path)
    assert rc == 2 and err.count("\n") == 1 and "links.storage_to_host" in err, err
    assert not out.exists()
    rc, err, _ = _cli(capsys, [f"hw={bad}"], tmp_path)  # nothing asked: the run is storage-direct, and says so
    assert rc == 0


def test_a_link_to_an_undefined_tier_is_refused(capsys, tmp_path):
    from sim.machine.hardware import PROFILES_DIR

    text = (PROFILES_DIR / "desktop-nvme.yaml").read_text().replace("  storage_to_host:", "  nvme_to_host:")
    bad = tmp_path / "tier.yaml"
    bad.write_text(text)
    rc, err, out = _cli(capsys, [f"hw={bad}"], tmp_path)
    assert rc == 2 and err.count("\n") == 1 and "links.nvme_to_host" in err, err
    assert not out.exists()


def test_hop_link_names_exist_in_the_tiered_profiles():
    from sim.machine.hardware import load_profile

    for name in ("desktop-nvme", "workstation-h100-nvme"):
        hw = load_profile(name)
        assert isinstance(hw.links["storage_to_host"], LinkSpec) and hw.host_memory_reserve_bytes > 0
        assert not hw.host_tier and hw.expert_link.name == "storage_to_device"
        assert dataclasses.replace(hw, host_tier=True).expert_link.name == "host_to_device"


# ------------------------------------------------------------------ serving over tiers
def _serve_tiered(seed: int, machine: str):
    """A serving run (closed or open loop, batched steps) on a tiered machine: `test_machines._serve`'s
    draw with the hops and a host cache of random size and policy."""
    rng = np.random.default_rng(seed)
    layers, experts, k = 3, int(rng.choice([8, 16])), 2
    tr = random_trace(rng, tokens=int(rng.integers(10, 16)), layers=layers, experts=experts, top_k=k,
                      prefill=int(rng.integers(2, 6)), sequences=int(rng.integers(2, 5)),
                      locality=float(rng.choice([0.0, 0.3, 0.5, 0.8])))
    cache = {"name": str(rng.choice(["lru", "lfu", "arc"])), "scope": str(rng.choice(["layer", "global"])),
             "slots": int(rng.integers(4, layers * experts // 2 + 2))}
    prefetch = {"name": "pregate", "count": int(rng.integers(1, 3)), "depth": int(rng.integers(1, 3))}
    if rng.random() < 0.3:
        prefetch["into"] = "host"
    elif rng.random() < 0.5:
        prefetch.update(admit="on_use", wait=bool(rng.random() < 0.5))
    cfg = config(cache=cache, prefetch=prefetch)
    cfg.host_cache.name = str(rng.choice(["lru", "lfu", "static"]))
    cfg.host_cache.slots = int(rng.integers(1, layers * experts + 1))
    cfg.tiers.pipelined = bool(rng.random() < 0.5)
    if rng.random() < 0.7:
        cfg.workload.kind, cfg.workload.users = "closed", int(rng.integers(2, 5))
    else:
        cfg.workload.kind, cfg.workload.rate = "open", float(rng.choice([20.0, 100.0, 1000.0]))
    h = tiered_hw(read_Bps=float(rng.choice([5e8, 2e9])), copy_Bps=float(rng.choice([1e9, 5e9])),
                  read_channels=int(rng.choice([1, 2])), copy_channels=int(rng.choice([1, 2])),
                  read_latency_s=float(rng.choice([0.0, 5e-5])))
    pre = preset(layers, experts, k)
    try:
        engine, info = build_engine(cfg, tr, h, pre, machine=machine)
    except UserError:
        return None
    return simulate(cfg, tr, h, engine=engine, info=info)


@pytest.mark.parametrize("seed", range(16))
def test_the_event_machine_gives_the_fast_machines_tiered_serving_run(seed):
    from tests.test_machines import _same_serving

    a, b = _serve_tiered(seed, "fast"), _serve_tiered(seed, "events")
    _same_serving(a, b)
    if a is not None:
        assert a.summary["host_cache_accesses"] > 0


# ------------------------------------------------------------------ host-cache policies
def _ctx(ids):
    from types import SimpleNamespace

    tr = trace(ids, len(ids[0]), 4)
    return SimpleNamespace(trace=tr, layers=tr.model.layers, experts=tr.model.experts)


def test_host_policies_choose_their_victims():
    from policies.host import HOST_POLICIES, host_policy

    ids = [[[0]], [[1]], [[2]], [[1]], [[0]], [[1]], [[3]]]  # rows 0-6 route experts 0 1 2 1 0 1 3
    ctx = _ctx(ids)
    every = lambda k: True  # noqa: E731
    lru = HOST_POLICIES["lru"](3, ctx)
    for t, k in enumerate((0, 1, 2)):
        lru.on_insert(k, t)
    lru.on_access(0, 3)
    assert lru.victim(4, every) == 1 and lru.victim(4, lambda k: k != 1) == 2
    lfu = HOST_POLICIES["lfu"](3, ctx)
    for k, n in ((0, 3), (1, 1), (2, 2)):
        lfu.on_insert(k, 0)
        for _ in range(n):
            lfu.on_access(k, 0)
    assert lfu.victim(1, every) == 1
    lfu.on_evict(1)
    assert lfu.victim(1, every) == 2  # (1 left)
    bel = HOST_POLICIES["belady"](3, ctx)
    for k in (0, 1, 2):
        bel.on_insert(k, 2)  # at row 2: next uses 0 -> 4, 1 -> 3, 2 -> never
    assert bel.victim(2, every) == 2
    bel.on_evict(2)
    assert bel.victim(2, every) == 0 and bel.victim(2, lambda k: k != 0) == 1
    assert bel.victim(4, every) == 0  # at row 4 expert 0's use is now: its next is none; 1's is row 5
    static = HOST_POLICIES["static"](2, ctx)
    assert static.warm_start() == [1, 0] and static.victim(0, every) is None  # most routed first, ties by key
    with pytest.raises(UserError, match="host_cache.name"):
        host_policy("mru")


def test_the_report_timeline_has_a_lane_per_hop():
    from sim.results.report import timeline_figure

    rng = np.random.default_rng(5)
    tr = random_trace(rng, tokens=6, layers=2, experts=8, top_k=2)
    res = _sim(_cfg(slots=4, host=6), tr, tiered_hw(), preset(2, 8, 2, hidden=512, width=1024))
    lanes = {y for trace_ in timeline_figure(res.events, res.tokens, window_tokens=6).data for y in trace_.y}
    assert {"storage_to_host", "host_to_device", "compute"} <= lanes and "link" not in lanes


def test_a_hop_that_shares_memory_bandwidth_is_refused_with_a_host_cache():
    h = tiered_hw()
    h = dataclasses.replace(h, links={**h.links, "host_to_device": dataclasses.replace(
        h.links["host_to_device"], shares_memory_bandwidth=True)})
    cfg = _cfg(slots=2, host=4)
    with pytest.raises(UserError, match="links.host_to_device.shares_memory_bandwidth"):
        build_engine(cfg, trace([[[0]], [[1]]], 1, 2), h, preset(1, 2, 1, hidden=512, width=1024))


def test_a_serving_run_books_every_steps_storage_stall():
    """A closed loop of one user runs its decode steps as the replay's (`decode_token`): their
    storage stall is in the serving summary's `stall_s_storage_to_host` with the batched steps'."""
    tr = random_trace(np.random.default_rng(2), tokens=10, layers=2, experts=8, top_k=2, prefill=3)
    pre = preset(2, 8, 2, hidden=512, width=1024)
    cfg = _cfg(slots=4, host=6)
    cfg.engine = dataclasses.replace(cfg.engine, prefill=True)
    cfg.workload.kind, cfg.workload.users, cfg.workload.order = "closed", 1, "trace"  # the replay, step for step
    res = _sim(cfg, tr, tiered_hw(read_Bps=1e9, copy_Bps=4e9), pre)
    engine_stall = res.summary["stall_s_storage_to_host"]
    replay_cfg = _cfg(slots=4, host=6)
    replay_cfg.engine = dataclasses.replace(replay_cfg.engine, prefill=True)
    replay = _sim(replay_cfg, tr, tiered_hw(read_Bps=1e9, copy_Bps=4e9), pre)
    assert res.tokens["end_s"].to_list() == replay.tokens["end_s"].to_list()
    decode = replay.summary["stall_s_per_token_storage_to_host"] * replay.summary["tokens_decode"]
    assert engine_stall > 0.0
    assert engine_stall == pytest.approx(decode + replay.summary["stall_s_storage_to_host_other"], rel=1e-9)


@pytest.mark.parametrize("args,needle", [
    (["hw=rtx4090.yaml", "tiers.pipelined=true"], "tiers.pipelined=true: this run has no host tier"),
    (["hw=jetson.yaml", "cache.into=host"], "cache.into"),
])
def test_tier_keys_where_they_mean_nothing_are_refused(capsys, tmp_path, args, needle):
    rc, err, out = _cli(capsys, args, tmp_path)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()
