"""`python -m sim realrun` end to end on a small synthetic trace, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")

from sim.cli import main  # noqa: E402
from sim.config import parse_run_config  # noqa: E402
from sim.results.metrics import SUMMARY_KEYS  # noqa: E402
from sim.trace.format import write_trace  # noqa: E402
from sim.trace.synthetic import random_trace  # noqa: E402

# toy-mixtral: 32 layers x 8 experts, top-2, bf16 experts of 49 KB: fast on any CPU
SMALL = ["model=toy-mixtral", "layers=4", "tokens=10", "cache.slots=12", "hw=rtx4090", "progress=false",
         "report=false"]


def synthetic_trace(folder: Path) -> Path:
    """The real-run tests' trace: 12 decode tokens after a 4-token prompt, 32 layers, some reuse."""
    write_trace(random_trace(np.random.default_rng(1), tokens=12, prefill=4, sequences=1, layers=32,
                             locality=0.4), folder)
    return folder


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    return synthetic_trace(tmp_path_factory.mktemp("rr") / "synth")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store") / "experts"


def cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_realrun_writes_results(trace_dir, store_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc, stdout, err = cli(["realrun", f"trace={trace_dir}", *SMALL, "policy=mixtral_offloading",
                           f"store_dir={store_dir}", f"out={out}"], capsys)
    assert rc == 0, err
    for f in ("config.yaml", "summary.json", "tokens.parquet", "layers.parquet", "events.parquet"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(s)
    assert s["tokens_decode"] == 10 and s["realrun_store"] == "disk"
    assert s["ttft_s"] > 0  # the 4-token prompt was prefilled for real
    assert s["page_cache_cold_s"] > 0 and "page_cache_not_a_page_cache_hit" in s
    tokens = pl.read_parquet(out / "tokens.parquet")
    assert tokens.height == 10 and (tokens["latency_s"] > 0).all()
    assert (tokens["start_s"][1:] - tokens["end_s"][:-1]).abs().max() < 1e-9  # contiguous decode tokens
    ev = pl.read_parquet(out / "events.parquet").filter(pl.col("lane") == "link")
    assert (ev["end_s"] >= ev["start_s"]).all() and (ev["start_s"] >= ev["issued_s"]).all()
    assert pl.read_parquet(out / "layers.parquet").height == 4
    assert "tpot_mean_s" in stdout


@pytest.mark.parametrize("policy,store", [("baseline", "disk"), ("lfu", "host"), ("fiddler", "host"),
                                          ("hobbit", "host"), ("hobbit", "disk")])
def test_counters_equal_the_simulators(trace_dir, store_dir, policy, store):
    """Without prefetch every decision is independent of timing: same hits, loads and bytes as `run`
    (HOBBIT's low-precision copies included: the real run moves the simulator's `low_bytes`)."""
    from sim.realrun.build import parse_realrun, preset_of, with_layers
    from sim.realrun.run import real_run
    from sim.runner import load_trace, simulate

    cfg, opts = parse_realrun([f"trace={trace_dir}", *SMALL, f"policy={policy}", f"store={store}",
                               f"store_dir={store_dir}"])
    real = real_run(cfg, opts)
    cfg2, tr = with_layers(cfg, load_trace(cfg.trace), preset_of(cfg), opts.layers)
    sim = simulate(cfg2, trace=tr)
    for k in ("hit_rate", "demand_loads_per_token", "bytes_loaded_per_token", "experts_per_token_layer"):
        assert real.summary[k] == pytest.approx(sim.summary[k]), k
    assert real.layers["hits"].to_list() == sim.layers["hits"].to_list()
    if policy == "fiddler":
        assert real.layers["cpu_experts"].sum() == sim.layers["cpu_experts"].sum() > 0
    if policy == "hobbit":  # some misses ran as low-bit copies, of the simulator's size
        link = real.events.filter(pl.col("lane") == "link")
        full = link["bytes"].max()
        low = link.filter(pl.col("bytes") < full)
        assert low.height > 0 and low["staging"].all() and (low["bytes"] == full / 16).all()  # 1 of 16 bits
        assert real.summary["dL_est"] == pytest.approx(sim.summary["dL_est"]) and sim.summary["dL_est"] > 0


SERVE = ["workload.kind=closed", "workload.users=3", "workload.requests=6", "workload.max_output=6"]


@pytest.mark.parametrize("policy,store,extra", [("baseline", "disk", []), ("fiddler", "host", []),
                                                ("baseline", "host", ["memory.kv=shared", "batch.prefill_chunk=2"])])
def test_batched_serving_steps_run_for_real_with_the_simulators_schedule(trace_dir, store_dir, policy, store, extra):
    """A serving workload on the real machine: the simulator's scheduler, batched steps (each expert
    once over its tokens; Fiddler's CPU experts on theirs). Without prefetch and with a closed loop
    every decision is independent of timing: the same steps, batches, unions and bytes as `run`."""
    from sim.realrun.build import parse_realrun, preset_of, with_layers
    from sim.realrun.run import real_run
    from sim.runner import load_trace, simulate

    small = [a for a in SMALL if not a.startswith("tokens=")]
    cfg, opts = parse_realrun([f"trace={trace_dir}", *small, f"policy={policy}", f"store={store}",
                               f"store_dir={store_dir}", *SERVE, *extra])
    real = real_run(cfg, opts)
    cfg2, tr = with_layers(cfg, load_trace(cfg.trace), preset_of(cfg), opts.layers)
    sim = simulate(cfg2, trace=tr)
    for k in ("requests", "steps", "batch_size_mean", "union_experts_per_layer_mean",
              "bytes_loaded_per_output_token", "preemptions"):
        assert real.summary[k] == sim.summary[k], k
    assert real.summary["batch_size_mean"] > 1.5
    cols = ["rid", "seq", "prompt_tokens", "output_tokens"]
    assert real.requests.select(cols).equals(sim.requests.select(cols))
    assert (real.requests["ttft_s"] > 0).all() and (real.requests["tpot_mean_s"] > 0).all()
    assert real.steps.select("requests", "decode_tokens", "prefill_tokens").equals(
        sim.steps.select("requests", "decode_tokens", "prefill_tokens"))
    if policy == "fiddler":
        assert real.layers["cpu_experts"].sum() == sim.layers["cpu_experts"].sum() > 0


def test_open_loop_and_speculative_serving_for_real(trace_dir, store_dir, tmp_path, capsys):
    """Open-loop arrivals on the wall clock, speculative verify steps with a draft model's time
    waited out; the results folder has the serving tables and the realrun facts."""
    out = tmp_path / "serve"
    small = [a for a in SMALL if not a.startswith("tokens=")]
    rc, stdout, err = cli(["realrun", f"trace={trace_dir}", *small, "policy=mixtral_offloading", "store=host",
                           f"store_dir={store_dir}", "workload.kind=open", "workload.rate=50", "workload.requests=5",
                           "workload.max_output=6", "spec.k=2", "spec.acceptance=0.6", "spec.draft_s=0.002",
                           f"out={out}"], capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"] == 5 and s["realrun_store"] == "host" and s["workload_kind"] == "open"
    req = pl.read_parquet(out / "requests.parquet")
    assert req.height == 5 and (req["output_tokens"] == 7).all()  # the prompt's token and 6 decoded
    assert (req["admitted_s"] >= req["arrival_s"] - 1e-9).all()  # no request starts before it arrives
    assert (out / "steps.parquet").is_file() and "throughput_tokens_per_s" in stdout


def test_adapmoe_staged_prefetches_run(trace_dir, store_dir):
    """AdapMoE's staged, waited-for prefetches and DP cache; pipelining and yielding prefetches."""
    from sim.realrun.build import parse_realrun
    from sim.realrun.run import real_run

    for extra in (["policy=adapmoe", "gating.sensitivity=trace"], ["policy=adapmoe_yield", "engine.pipelining=true"]):
        cfg, opts = parse_realrun([f"trace={trace_dir}", *SMALL, f"store_dir={store_dir}", *extra])
        s = real_run(cfg, opts).summary
        assert s["tokens_decode"] == 10 and s["prefetch_issued"] > 0
        assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
        assert s["cache_peak_bytes"] <= s["cache_bytes"] + 1e-6


def test_same_run_config_as_run(trace_dir):
    """realrun's keys are run's keys plus its own; unknown keys are refused the same way."""
    from sim.realrun.build import LOCAL_PROFILE, RealOptions, parse_realrun

    cfg, opts = parse_realrun([f"trace={trace_dir}", "model=toy-mixtral", "policy=adapmoe", "gating.T=0.01",
                               "device=cpu", "store=host"])
    assert cfg == parse_run_config([f"trace={trace_dir}", "model=toy-mixtral", "policy=adapmoe", "gating.T=0.01",
                                    f"engine.max_tokens={RealOptions().tokens}",
                                    *([f"hw={LOCAL_PROFILE}"] if cfg.hw == LOCAL_PROFILE else [])])
    assert (opts.device, opts.store) == ("cpu", "host")


@pytest.mark.parametrize("extra,needle", [
    (["device=cuda"], "cuda"),
    (["store=tape"], "store must be one of"),
    (["cache.slots=1"], "one layer needs 2"),
    (["hw=README.md"], "README.md"),
    (["placement.name=cpu_on_miss"], "store=host"),
    (["model=olmoe-1b-7b"], "does not match model preset"),
    (["model=mixtral-8x7b"], "bits must be 32 or 16"),
    (["bogus=1"], "unknown key"),
])
def test_bad_inputs(trace_dir, store_dir, tmp_path, capsys, extra, needle):
    if extra == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "res"
    args = ["realrun", f"trace={trace_dir}", *SMALL, f"store_dir={store_dir}", f"out={out}", *extra]
    if extra == ["hw=README.md"]:
        args[args.index("hw=rtx4090")] = f"hw={Path(__file__).resolve().parents[1] / 'hwprofiles' / 'README.md'}"
        args.remove("hw=README.md")
    rc, _, err = cli(args, capsys)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["workload.kind=closed", "spec.k=50"], "spec.k=50"),
    (["workload.kind=open", "tokens=4"], "workload.max_output"),
    (["workload.kind=closed", "workload.users=0"], "workload.users"),
])
def test_bad_serving_inputs_write_no_store(trace_dir, tmp_path, capsys, extra, needle):
    """A serving workload that cannot run is refused before any store is written."""
    out, store = tmp_path / "res", tmp_path / "store"
    small = [a for a in SMALL if not a.startswith("tokens=")]
    rc, _, err = cli(["realrun", f"trace={trace_dir}", *small, f"store_dir={store}", f"out={out}", *extra], capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not store.exists()


def test_store_folder_not_writable(trace_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = cli(["realrun", f"trace={trace_dir}", *SMALL, f"store_dir={blocker / 'sub'}",
                      f"out={tmp_path / 'res'}"], capsys)
    assert rc == 2 and "not writable" in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()


def test_store_folder_without_space(trace_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import sim.realrun.store as store

    class Tiny:
        free = 1000

    class TinyDisk:  # the store's view of the disk only (the results folder is checked for space too)
        disk_usage = staticmethod(lambda p: Tiny)

    monkeypatch.setattr(store, "shutil", TinyDisk)
    rc, _, err = cli(["realrun", f"trace={trace_dir}", *SMALL, f"store_dir={tmp_path / 'full'}",
                      f"out={tmp_path / 'res'}"], capsys)
    assert rc == 2 and "GB free" in err and err.count("\n") == 1
    assert not list((tmp_path / "full").glob("*.safetensors"))  # refused before writing anything
    assert shutil.disk_usage is not Tiny


def test_an_existing_disk_store_is_opened_not_rewritten(tmp_path, monkeypatch):
    """The second open of the same store reads its manifest and writes nothing (a JSON round trip
    once made every open rewrite the whole store: gigabytes of writes before each run)."""
    import sim.realrun.store as st
    from sim.realrun.backend import Backend

    layout = st.Layout(2, 4, ((16, 8), (16, 8), (8, 16)), "float32")
    backend = Backend("cpu", 1, pin=False)
    folder = tmp_path / "s"
    st.open_disk_store(folder, layout, backend, st.random_fill(layout, 0), "random seed 0", progress=False).close()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    writes = []
    monkeypatch.setattr(st, "write_disk_store", lambda *a, **k: writes.append(a))
    st.open_disk_store(folder, layout, backend, st.random_fill(layout, 0), "random seed 0", progress=False).close()
    assert writes == [] and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    # a different fill is a different store: written again (here by the stub, so the old files stay)
    st.open_disk_store(folder, layout, backend, st.random_fill(layout, 1), "random seed 1", progress=False).close()
    assert len(writes) == 1


def _openmp_max_threads():
    """omp_get_max_threads of torch's own OpenMP runtime, for the calling thread (None if not found)."""
    import ctypes

    with open("/proc/self/maps") as fh:
        libs = {line.split()[-1] for line in fh if "omp" in line.rsplit("/", 1)[-1]}
    for lib in sorted(libs):
        try:
            return ctypes.CDLL(lib).omp_get_max_threads
        except (OSError, AttributeError):
            continue
    return None


def test_worker_threads_use_the_runs_thread_count():
    """OpenMP's thread count is per thread: without setting it, a worker thread computed with one
    OpenMP thread per CPU, all pinned to its one CPU (an expert took 50x longer on an Intel Xeon)."""
    import os

    from sim.realrun.backend import Backend
    from sim.realrun.compute import CpuWorker

    get = _openmp_max_threads()
    if get is None or (os.cpu_count() or 1) < 2:
        pytest.skip("needs torch's OpenMP runtime and two CPUs (a fresh thread then defaults to more than one)")
    backend = Backend("cpu", threads=1, pin=True)
    worker = CpuWorker(backend)
    try:
        with backend.pinned():
            worker.submit([(0, lambda: torch.tensor(get()))])
            assert int(worker.wait()[0]) == 1
    finally:
        worker.close()


def test_kept_host_store_is_built_once_and_serves_every_run(trace_dir, store_dir, monkeypatch):
    """`confirm` keeps the host-memory store between runs: built on first use, the same counters
    as a run that builds its own, freed by `close()`."""
    import sim.realrun.run as rr
    from sim.realrun.build import parse_realrun

    built = []

    class CountingHostStore(rr.HostStore):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(rr, "HostStore", CountingHostStore)
    cfg, opts = parse_realrun([f"trace={trace_dir}", *SMALL, "policy=fiddler", "store=host",
                               f"store_dir={store_dir}"])
    alone = rr.real_run(cfg, opts)
    assert len(built) == 1
    keep = rr.KeptStores()
    runs = [rr.real_run(cfg, opts, keep=keep) for _ in range(2)]
    assert len(built) == 2  # one more, for both kept runs
    for r in runs:
        for k in ("hit_rate", "demand_loads_per_token", "experts_per_token_layer"):
            assert r.summary[k] == pytest.approx(alone.summary[k]), k
        assert r.layers["cpu_experts"].to_list() == alone.layers["cpu_experts"].to_list()
        assert sum(r.layers["cpu_experts"]) > 0
    (store,) = keep._stores.values()
    assert store.tensors
    keep.close()
    assert not store.tensors and not keep._stores


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_low_bit_copies_round_to_the_nearest_level(bits):
    """A packed copy holds 8 / bits codes per byte; unpacked, every weight is within half a step."""
    import torch

    from sim.realrun.low import dequantise, quantise

    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(bits))
    packed, lo, step = quantise(x, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (6, 16 * bits // 8)
    y = dequantise(packed, lo, step, bits, torch.float32)
    assert ((y - x).abs().max(dim=1).values <= step / 2 + 1e-6).all()
    assert torch.allclose(dequantise(*quantise(y, bits), bits, torch.float32), y, atol=1e-6)  # codes are stable


def test_low_bits_that_do_not_pack_are_refused(trace_dir, store_dir):
    from sim.errors import UserError
    from sim.realrun.build import parse_realrun
    from sim.realrun.run import real_run

    cfg, opts = parse_realrun([f"trace={trace_dir}", *SMALL, "policy=hobbit", "placement.low_bits=3",
                               f"store_dir={store_dir}"])
    with pytest.raises(UserError, match="packs low-precision copies at 1, 2, 4 or 8 bits"):
        real_run(cfg, opts)
