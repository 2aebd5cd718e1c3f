"""The real run's host tier (`sim/realrun/tiers.py`): disk -> host buffers -> device slots.

A tiered real run (`store=disk`, a profile with a host tier, `host_cache.slots=N`) keeps the
simulator's books (`TierLink`): every read logged, the host cache's counters as the simulator's
where no decision depends on timing, never over capacity, reads only of experts not in host
memory; and it computes the very outputs the untiered real run computes from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

torch = pytest.importorskip("torch")

from sim.cli import main  # noqa: E402
from tests.test_realrun import synthetic_trace  # noqa: E402

# toy-mixtral: bf16 experts of 49 KB; 4 layers x 8 experts = 32 experts; desktop-nvme has both hops
SMALL = ["model=toy-mixtral", "layers=4", "tokens=10", "cache.slots=12", "hw=desktop-nvme", "progress=false",
         "report=false"]
ALL_EXPERTS = 4 * 8
#: the keys of a tiered run's books that no timing decides without prefetch (the simulator's = the real run's)
BOOKS = ("host_cache_hit_rate", "host_cache_late_share", "host_cache_accesses", "host_reads", "host_reads_bypassed",
         "host_cache_evictions", "host_cache_peak_slots", "bytes_per_token_storage_to_host",
         "bytes_per_token_host_to_device", "hit_rate", "demand_loads_per_token")


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    return synthetic_trace(tmp_path_factory.mktemp("rrt") / "synth")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store") / "experts"


def _run(trace_dir, store_dir, *extra, record=None, monkeypatch=None):
    """(the real run's RunResult, the simulator's on the same config, trace and profile)."""
    from sim.realrun.build import parse_realrun, preset_of, with_layers
    from sim.realrun.run import real_run
    from sim.runner import load_trace, simulate

    cfg, opts = parse_realrun([f"trace={trace_dir}", *SMALL, f"store_dir={store_dir}", *extra])
    if record is not None:  # the MoE block outputs the real run computes, per decode layer, in order
        from sim.realrun.compute import RandomKernels

        monkeypatch.setattr(RandomKernels, "combine",
                            lambda self, outs: record.append({k: v.detach().clone() for k, v in outs.items()}))
    real = real_run(cfg, opts)
    cfg2, tr = with_layers(cfg, load_trace(cfg.trace), preset_of(cfg), opts.layers)
    return real, simulate(cfg2, trace=tr)


def _reads(res) -> pl.DataFrame:
    return res.events.filter(pl.col("lane") == "storage_to_host")


def _check_reads(res, slots: int) -> None:
    """Every read logged, in time, whole; at most one read per expert in flight; never over capacity."""
    s = res.summary
    reads = _reads(res)
    assert reads.height == s["host_reads"], "every read has its row in the events"
    assert (reads["issued_s"] >= 0).all() and (reads["start_s"] >= reads["issued_s"]).all()
    assert (reads["end_s"] > reads["start_s"]).all()
    assert (reads["bytes"] == s["expert_bytes"]).all()
    assert (reads["staging"].sum()) == s["host_reads_bypassed"]
    for _, g in reads.group_by(["layer", "expert"]):  # one read per expert at a time
        g = g.sort("issued_s")
        assert (g["issued_s"][1:] >= g["end_s"][:-1]).all(), g
    assert s["host_cache_peak_slots"] <= slots and s["realrun_host_slots_peak"] <= slots
    assert 0.0 <= s["link_utilization_storage_to_host"] <= 1.0
    stall = s["stall_s_per_token_storage_to_host"] if res.requests is None else s["stall_s_storage_to_host"]
    assert stall >= 0.0


@pytest.mark.parametrize("policy,slots,extra", [
    ("baseline", 16, []),
    ("baseline", 1, []),  # top-2 with one host slot: the second read of a layer goes through a bounce buffer
    ("baseline", 16, ["host_cache.name=lfu", "tiers.pipelined=true"]),
    ("fiddler", 8, []),  # CPU jobs on the host cache, waiting for their reads
])
def test_a_tiered_real_run_keeps_the_simulators_books(trace_dir, store_dir, policy, slots, extra):
    """Without prefetch and without prefill no host decision depends on timing (each decode layer's
    copies end before the next layer's loads; a prefill batch keeps several copies in flight while it
    issues more, so which host experts are pinned when a read needs a slot depends on when copies
    end): the real run's host cache counts what the simulator's counts; every access is a hit, a
    late follower or one read."""
    real, sim = _run(trace_dir, store_dir, f"policy={policy}", f"host_cache.slots={slots}", "engine.prefill=false",
                     *extra)
    s = real.summary
    for k in BOOKS:
        assert s[k] == pytest.approx(sim.summary[k]), k
    assert s["realrun_store"] == "disk" and s["host_cache_slots"] == slots
    hits = round(s["host_cache_hit_rate"] * s["host_cache_accesses"])
    late = round(s["host_cache_late_share"] * s["host_cache_accesses"])
    assert hits + late + s["host_reads"] == s["host_cache_accesses"] > 0  # hits + misses = accesses
    _check_reads(real, slots)
    if slots == 1:
        assert s["host_reads_bypassed"] > 0
    copies = real.events.filter(pl.col("lane") == "host_to_device")
    cpu = real.layers["cpu_experts"].sum()
    assert cpu == sim.layers["cpu_experts"].sum() and (cpu > 0) == (policy == "fiddler")
    assert copies.height + cpu == s["host_cache_accesses"]  # each device copy and CPU expert looked up once
    # (fiddler without a prefill computes every missed expert on the CPU: no device copy)
    assert (copies.height > 0) == (policy != "fiddler") and real.events.filter(pl.col("lane") == "link").height == 0
    pipelined = "tiers.pipelined=true" in extra
    for r in _reads(real).iter_rows(named=True):  # the copies that followed this read
        follow = copies.filter((pl.col("layer") == r["layer"]) & (pl.col("expert") == r["expert"])
                               & (pl.col("issued_s") >= r["issued_s"]) & (pl.col("issued_s") < r["end_s"]))
        # whole: queued when the read ends; pipelined: it may start before, but ends after the read
        assert (follow["end_s" if pipelined else "start_s"] >= r["end_s"]).all(), (r, follow)


def test_a_host_cache_of_every_expert_reads_each_at_most_once(trace_dir, store_dir):
    """An lru host cache as large as the model never evicts: no expert is read twice (reads only of
    experts not in host memory)."""
    real, _ = _run(trace_dir, store_dir, "policy=baseline", f"host_cache.slots={ALL_EXPERTS}")
    reads = _reads(real)
    assert reads.height == real.summary["host_reads"] > 0
    assert reads.select("layer", "expert").is_unique().all()
    assert real.summary["host_cache_evictions"] == 0
    _check_reads(real, ALL_EXPERTS)


def test_a_static_host_cache_of_every_expert_reads_nothing(trace_dir, store_dir):
    """`static` holds every expert from before the clock starts: every lookup hits, nothing is read
    during the run, every device load is a copy from host memory."""
    real, sim = _run(trace_dir, store_dir, "policy=baseline", "host_cache.name=static",
                     f"host_cache.slots={ALL_EXPERTS}")
    s = real.summary
    assert s["host_reads"] == 0 and _reads(real).height == 0 and s["bytes_per_token_storage_to_host"] == 0
    assert s["host_cache_hit_rate"] == 1.0 and s["stall_s_per_token_storage_to_host"] == 0
    assert s["realrun_host_slots_peak"] == ALL_EXPERTS and s["realrun_host_buffers"] >= ALL_EXPERTS
    # every device load (prefill's included) is one host lookup and one copy from host memory
    assert real.events.filter(pl.col("lane") == "host_to_device").height == s["host_cache_accesses"] > 0
    for k in BOOKS:
        assert s[k] == pytest.approx(sim.summary[k]), k


def _same_outputs(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("tiered", [["host_cache.slots=1"], ["host_cache.slots=6", "tiers.pipelined=true",
                                                              "host_cache.name=lfu"]])
def test_the_outputs_are_the_untiered_real_runs(trace_dir, store_dir, monkeypatch, tiered):
    """The same experts computed from the same weights: the MoE block outputs of the tiered run
    (through host buffers, bounce buffers, pipelined copies) equal those read straight from the disk."""
    direct, tiers = [], []
    _run(trace_dir, store_dir, "policy=baseline", "host_cache.slots=0", record=direct, monkeypatch=monkeypatch)
    real, _ = _run(trace_dir, store_dir, "policy=baseline", *tiered, record=tiers, monkeypatch=monkeypatch)
    assert real.summary["host_reads"] > 0
    _same_outputs(direct, tiers)


def test_cpu_experts_from_the_host_cache_are_those_from_host_memory(trace_dir, store_dir, monkeypatch):
    """Fiddler's CPU experts computed from the host cache (read from the disk first) equal those
    computed from a store in host memory."""
    host, tiers = [], []
    _run(trace_dir, store_dir, "policy=fiddler", "store=host", record=host, monkeypatch=monkeypatch)
    real, _ = _run(trace_dir, store_dir, "policy=fiddler", "host_cache.slots=2", record=tiers,
                   monkeypatch=monkeypatch)
    assert real.layers["cpu_experts"].sum() > 0 and real.summary["host_reads_bypassed"] > 0
    _same_outputs(host, tiers)


def test_prefetch_into_host_and_a_serving_workload_run_tiered(trace_dir, store_dir):
    """Prefetches into host memory only (`prefetch.into=host`) are reads of their own; a serving run's
    batched steps go through the host tier too, with the per-tier serving figures."""
    real, _ = _run(trace_dir, store_dir, "policy=mixtral_offloading", "prefetch.into=host", "host_cache.slots=16")
    s = real.summary
    assert s["host_prefetches"] > 0 and s["prefetch_issued"] == 0
    assert s["host_reads"] >= s["host_prefetches"]
    _check_reads(real, 16)
    small = [a for a in SMALL if not a.startswith("tokens=")]
    from sim.realrun.build import parse_realrun
    from sim.realrun.run import real_run

    cfg, opts = parse_realrun([f"trace={trace_dir}", *small, f"store_dir={store_dir}", "policy=baseline",
                               "host_cache.slots=8", "workload.kind=closed", "workload.users=3",
                               "workload.requests=6", "workload.max_output=6"])
    serve = real_run(cfg, opts)
    assert serve.summary["requests"] == 6 and serve.summary["host_reads"] > 0
    assert serve.summary["bytes_per_output_token_storage_to_host"] > 0
    _check_reads(serve, 8)


@pytest.mark.parametrize("extra,needle", [
    (["policy=hobbit", "host_cache.slots=8"], "placement.name=low_precision_on_miss"),
    (["store=host", "host_cache.slots=8"], "store=host keeps every expert in host memory"),
    (["channels=2", "host_cache.slots=8"], "channels=2"),
])
def test_what_a_tiered_real_run_does_not_execute_is_refused(trace_dir, store_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "res"
    rc = main(["realrun", f"trace={trace_dir}", *SMALL, f"store_dir={store_dir}", f"out={out}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_three_tier_confirm_arm(trace_dir, store_dir, tmp_path, capsys):
    """`tiersN`: the first arm's policy on disk behind a host cache of N; the other disk arms run
    storage-direct; the row has the per-tier figures, measured and simulated."""
    out = tmp_path / "confirm"
    rc = main(["confirm", "profile=desktop-nvme", "arms=baseline,tiers8", f"trace={trace_dir}", "model=toy-mixtral",
               "layers=4", "tokens=6", "slots=12", "repeats=1", f"store_dir={store_dir}", "progress=false",
               f"out={out}"])
    assert rc == 0, capsys.readouterr().err
    frame = pl.read_parquet(out / "confirm.parquet")
    assert frame["arm"].to_list() == ["baseline", "baseline_tiers8"] and frame["host_slots"].to_list() == [0, 8]
    base, tiers = frame.row(0, named=True), frame.row(1, named=True)
    assert base["measured_host_reads_tier"] is None and base["profile_changes"] == ""
    assert tiers["profile_changes"] == ""  # desktop-nvme describes a discrete device: nothing to change
    for k in ("host_cache_hit_rate", "host_reads", "bytes_per_token_storage_to_host"):
        assert tiers[f"measured_{k}_tier"] == pytest.approx(tiers[f"simulated_{k}_tier"]), k
    assert tiers["measured_host_reads_tier"] > 0 and tiers["measured_tpot_mean_s"] > 0
    real = json.loads((out / "baseline_tiers8" / "realrun" / "summary.json").read_text())
    assert real["host_cache_slots"] == 8 and real["host_reads"] > 0
    direct = json.loads((out / "baseline" / "realrun" / "summary.json").read_text())
    assert "host_reads" not in direct and direct["host_cache_from"] == "host_cache off (storage_to_device)"


def test_the_tier_profile_of_a_cpu_calibration_says_what_it_changes():
    """On device=cpu the calibrated profile has unified memory (and measured contention): the
    three-tier arm runs it as a discrete device without contention on its hops, and says so."""
    import dataclasses

    from sim.errors import UserError
    from sim.machine.hardware import load_profile
    from sim.realrun.confirm import ConfirmOptions, parse_arms, profile_for, tier_changes

    hw = load_profile("desktop-nvme")
    hop = dataclasses.replace(hw.links["host_to_device"], shares_memory_bandwidth=True)
    cpu = dataclasses.replace(hw, unified_memory=True, links={**hw.links, "host_to_device": hop})
    tiered = profile_for(cpu, "disk", tiered=True)
    assert not tiered.unified_memory and not tiered.links["host_to_device"].shares_memory_bandwidth
    said = tier_changes(cpu)
    assert "unified_memory: false" in said and "links.host_to_device.shares_memory_bandwidth: false" in said
    assert tier_changes(hw) == "" and profile_for(cpu, "disk").unified_memory  # the other arms: as calibrated
    bare = dataclasses.replace(hw, links={k: v for k, v in hw.links.items() if k != "storage_to_host"})
    with pytest.raises(UserError, match="no storage_to_host link"):
        profile_for(bare, "disk", tiered=True)
    arms = parse_arms("adapmoe,tiers32", ConfirmOptions())
    assert arms[1].name == "adapmoe_tiers32" and arms[1].store == "disk" and arms[1].host_slots == 32
    assert "host_cache.slots=32" in arms[1].overrides


@pytest.mark.parametrize("cuda", [False, True])
def test_calibrate_describes_both_hops_of_a_tiered_run(tmp_path, monkeypatch, cuda):
    """With the disk, the profile has `storage_to_host`, `host_to_device` and
    `host_memory_reserve_bytes`, every number measured; on CUDA the read into pinned host buffers is
    its own series, on the CPU it is the disk series (a slot is host memory)."""
    import sim.realrun.profile as profile
    from sim.commands.calibrate import write_profile
    from sim.machine.hardware import load_profile
    from sim.realrun.calibrate import DISK_HOST, CalibrateOptions, Measured, Series

    def series(per_byte_s: float, lat_s: float) -> Series:
        s = Series()
        for nbytes in (1e5, 4e5, 1.6e6):
            s.add(nbytes, [lat_s + nbytes * per_byte_s] * 3)
        return s

    class FakeBackend:  # build_profile reads only these
        def __init__(self, cuda: bool):
            self.cuda = cuda

        def describe(self) -> str:
            return "a test machine"

    monkeypatch.setattr(profile, "memory_facts", lambda b: {"device": 80e9, "host": 64e9, "reserve": 1e9,
                                                            "host_reserve": 3e9})
    links = {"disk": series(1 / 2e9, 1e-4), "host": series(1 / 10e9, 2e-5)}
    if cuda:
        links[DISK_HOST] = series(1 / 3e9, 8e-5)
    cont = {k: [(1.0, 0.0, 1.0)] for k in ("disk", "host")}
    m = Measured(FakeBackend(cuda), [1e5, 4e5, 1.6e6], 512, (), 3, links, series(1 / 50e9, 1e-5),
                 series(1 / 50e9, 1e-5), series(1 / 20e9, 2e-5), [1e11], 0.0, [1e10], cont,
                 [{"device": 1e-3, "layer_bytes": 1e5, "expert_bytes": 1e5, "k": 2}])
    opts = CalibrateOptions(device="cuda" if cuda else "cpu", store="disk")
    prof, rows = profile.build_profile(m, opts, "python -m sim calibrate (test)")
    write_profile(prof, tmp_path / "p.yaml", "# test\n")
    hw = load_profile(str(tmp_path / "p.yaml"))
    assert {"storage_to_device", "storage_to_host", "host_to_device"} <= set(hw.links)
    assert hw.host_memory_reserve_bytes == 3e9
    assert all(s.startswith("measured: python -m sim calibrate (test)") for s in hw.sources.values())
    read = hw.links["storage_to_host"]
    want = 3e9 if cuda else 2e9  # its own series on CUDA, the disk's on the CPU
    assert read.bandwidth_Bps == pytest.approx(want, rel=1e-6) and read.channels == 1
    assert not read.shares_memory_bandwidth
    assert ("into pinned host buffers" in hw.sources["links.storage_to_host.bandwidth_Bps"]) == cuda
    assert hw.unified_memory == (not cuda)
