"""`python -m sim sweep`: grid parsing, the table, resume, failing points, bad inputs, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from sim import REPO_ROOT
from sim.cli import main
from sim.config import parse_run_config
from sim.errors import UserError
from sim.runner import simulate
from sim.sweep import run_sweep
from sim.sweep.grid import parse_grid, parse_values
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tr") / "synth"
    write_trace(random_trace(np.random.default_rng(0), tokens=24, prefill=4, layers=32, locality=0.4,
                             name="mixtral-8x7b"), d)
    return d


@pytest.fixture(scope="module")
def slow_trace_dir(tmp_path_factory) -> Path:
    """Enough tokens that a 48-point sweep takes a few seconds (to be killed midway)."""
    d = tmp_path_factory.mktemp("tr") / "synth-slow"
    write_trace(random_trace(np.random.default_rng(1), tokens=160, layers=32, locality=0.3, name="mixtral-8x7b"), d)
    return d


def grid(trace_dir: Path) -> list[str]:
    return [f"trace={trace_dir}", "hw=jetson.yaml,rtx4090.yaml", "policy=baseline,mixtral_offloading",
            "cache.slots=32:64:32"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ the grid


def test_values_and_ranges():
    assert parse_values("cache.slots", "16,32") == ["16", "32"]
    assert parse_values("cache.slots", "16:64:16") == ["16", "32", "48", "64"]
    assert parse_values("cache.slots", "16:60:16") == ["16", "32", "48"]
    assert parse_values("cache.slots", "8,32:64:32") == ["8", "32", "64"]
    assert parse_values("cache.slots", "64:32:-16") == ["64", "48", "32"]
    assert parse_values("gating.T", "0.001:0.003:0.001") == ["0.001", "0.002", "0.003"]
    assert parse_values("gating.T", "0:0.3:0.1") == ["0.0", "0.1", "0.2", "0.3"]
    assert parse_values("hw", "jetson.yaml") == ["jetson.yaml"]
    g = parse_grid(["policy=lru,adapmoe", "cache.slots=1:3:1"])
    assert list(g) == ["policy", "cache.slots"] and g["cache.slots"] == ["1", "2", "3"]


@pytest.mark.parametrize("pairs, message", [
    (["cache.slots="], "empty value list"),
    (["cache.slots=16,,32"], "empty item"),
    (["cache.slots=16:64:0"], "step is 0"),
    (["cache.slots=64:16:16"], "range is empty"),
    (["cache.slots=16:64"], "a:b:step"),
    (["policy=lru", "policy=adapmoe"], "given twice"),
    (["policy"], "key=value"),
])
def test_grid_errors(pairs, message):
    with pytest.raises(UserError, match=message):
        parse_grid(pairs)


# ---------------------------------------------------------------------------------- the table


def test_table_has_every_config_and_summary_key(trace_dir, tmp_path):
    res = run_sweep(grid(trace_dir), tmp_path / "sw", jobs=1, progress=False, report=False)
    t = res.table
    assert res.points == t.height == 8 and res.ran == 8 and res.failed == 0
    assert (tmp_path / "sw" / "sweep.parquet").is_file() and (tmp_path / "sw" / "sweep.yaml").is_file()
    assert_frame_equal(pl.read_parquet(tmp_path / "sw" / "sweep.parquet"), t)
    # grid order: the first key varies slowest
    assert t["hw"].to_list() == ["jetson.yaml"] * 4 + ["rtx4090.yaml"] * 4
    assert t["cache.slots"].to_list() == [32, 64] * 4
    assert t["point"].n_unique() == 8 and t["error"].null_count() == 8
    for row in t.iter_rows(named=True):
        cfg = parse_run_config([f"trace={trace_dir}", f"hw={row['hw']}", f"policy={row['policy']}",
                                f"cache.slots={row['cache.slots']}"])
        summary = simulate(cfg).summary
        for key, value in summary.items():  # every summary key, the very same numbers
            assert row[key] == value, key
        for key in ("gating.name", "prefetch.name", "cache.name", "cache.scope", "placement.name",
                    "engine.prefill", "quant.bits", "seed", "model"):
            assert key in t.columns
    layers = pl.read_parquet(tmp_path / "sw" / "layers.parquet")
    assert layers.height == 8 * 32 and set(layers["point"]) == set(t["point"])


def test_rerun_skips_finished_points(trace_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    rc, stdout, _ = run_cli(["sweep", *grid(trace_dir), f"out={out}", "jobs=1", "progress=false"], capsys)
    assert rc == 0 and "8 run, 0 done before, 0 failed" in stdout.splitlines()[-1]
    first = pl.read_parquet(out / "sweep.parquet")
    assert (out / "report.html").is_file()
    rc, stdout, err = run_cli(["sweep", *grid(trace_dir), f"out={out}", "jobs=1", "progress=false"], capsys)
    assert rc == 0 and "0 run, 8 done before" in stdout.splitlines()[-1] and "resuming" in err
    assert_frame_equal(pl.read_parquet(out / "sweep.parquet"), first)


def test_extend_reuses_points(trace_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    assert run_cli(["sweep", *grid(trace_dir), f"out={out}", "jobs=1", "progress=false", "report=false"],
                   capsys)[0] == 0
    bigger = [*grid(trace_dir)[:-1], "cache.slots=32:96:32"]
    rc, _, err = run_cli(["sweep", *bigger, f"out={out}", "jobs=1", "progress=false", "report=false"], capsys)
    assert rc == 2 and "different sweep" in err
    res = run_sweep(bigger, out, jobs=1, progress=False, report=False, extend=True)
    assert (res.points, res.ran, res.skipped) == (12, 4, 8)


def test_process_pool_equals_serial(trace_dir, tmp_path):
    a = run_sweep(grid(trace_dir), tmp_path / "a", jobs=1, progress=False, report=False)
    b = run_sweep(grid(trace_dir), tmp_path / "b", jobs=2, progress=False, report=False)
    assert_frame_equal(a.table, b.table)
    assert_frame_equal(a.layers, b.layers)


def test_failing_point_is_recorded_and_does_not_stop_the_sweep(trace_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    # adapmoe's DP cache needs a slot per layer: 8 slots over 32 layers fails when its engine is built
    # (before any point runs); baseline runs with 8 slots, so the combination fails, not the value
    args = ["sweep", f"trace={trace_dir}", "policy=adapmoe,baseline", "cache.slots=8,64", f"out={out}", "jobs=2",
            "progress=false"]
    rc, stdout, _ = run_cli(args, capsys)
    assert rc == 1
    assert "3 run, 0 done before, 1 failed" in stdout.splitlines()[-1]
    t = pl.read_parquet(out / "sweep.parquet")
    assert t.height == 4
    assert t["error"].to_list()[1:] == [None, None, None] and "does not fit 8 slots" in t["error"][0]
    assert t["tpot_mean_s"][0] is None and t["tpot_mean_s"][1] > 0
    assert "Failed points (1)" in (out / "report.html").read_text()
    # a rerun builds the failed point again (it still fails, and runs nothing)
    rc, stdout, _ = run_cli(args, capsys)
    assert rc == 1 and "0 run, 3 done before, 1 failed" in stdout.splitlines()[-1]


def test_a_value_no_point_can_build_is_refused_before_any_point_runs(trace_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "policy=adapmoe", "cache.slots=8,32,64", f"out={out}",
                          "jobs=1", "progress=false"], capsys)
    assert "cache.slots=8: cache.min_slots=1 does not fit 8 slots" in one_line_error(rc, err)
    assert not (out / "points").exists() or not list((out / "points").iterdir())


def test_knob_of_another_policy_is_dropped_where_it_does_not_apply(trace_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "policy=baseline,adapmoe", "gating.T=0.001,0.01",
                          "cache.slots=64", f"out={out}", "jobs=1", "progress=false", "report=false"], capsys)
    assert rc == 0 and "gating.T does not apply" in err and "run and stored once, 3 rows" in err
    t = pl.read_parquet(out / "sweep.parquet")
    assert t.height == 3 and t["point"].n_unique() == 3  # one row per key
    base = t.filter(pl.col("policy") == "baseline")
    assert base.height == 1 and base["gating.T"].null_count() == 1  # one config, run and stored once
    assert t.filter(pl.col("policy") == "adapmoe")["gating.T"].to_list() == [0.001, 0.01]


def test_changed_trace_is_not_a_finished_point(trace_dir, tmp_path):
    d = tmp_path / "tr"
    write_trace(random_trace(np.random.default_rng(5), tokens=8, layers=32, name="mixtral-8x7b"), d)
    g = [f"trace={d}", "cache.slots=32"]
    a = run_sweep(g, tmp_path / "sw", jobs=1, progress=False, report=False)
    write_trace(random_trace(np.random.default_rng(6), tokens=8, layers=32, name="mixtral-8x7b"), d, overwrite=True)
    with pytest.raises(UserError, match="trace or hardware files changed"):
        run_sweep(g, tmp_path / "sw", jobs=1, progress=False, report=False)
    b = run_sweep(g, tmp_path / "sw", jobs=1, progress=False, report=False, extend=True)
    assert b.ran == 1 and a.table["point"][0] != b.table["point"][0]


def test_same_points_spelled_differently_resume(trace_dir, tmp_path):
    a = run_sweep([f"trace={trace_dir}", "cache.slots=32,64"], tmp_path / "sw", jobs=1, progress=False,
                  report=False)
    b = run_sweep([f"trace={trace_dir}", "hw=jetson.yaml", "cache.slots=32:64:32"], tmp_path / "sw", jobs=1,
                  progress=False, report=False)  # hw=jetson.yaml is the default
    assert b.ran == 0 and b.skipped == 2
    assert a.table["point"].to_list() == b.table["point"].to_list()


# ------------------------------------------------------------------------------- bad inputs


def one_line_error(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["cache_slots=32,64"], "unknown key 'cache_slots'; valid keys: hw, trace, model, model_overrides, policy"),
    (["gating.T="], "empty value list"),
    (["seed=1:4:0"], "step is 0"),
    (["policy=baseline,nope"], "policy=nope: unknown policy preset 'nope'; known:"),
    (["policy=adapmoe", "gating.TT=1,2"], "unknown key 'gating.TT' for gating policy 'adapmoe'; valid:"),
    (["gating.T=1,2"], "gating policy 'topk' takes no knobs"),
    (["hw=nope.yaml"], "hardware profile 'nope.yaml' not found"),
    (["executor=dask"], "unknown executor 'dask'"),
    (["jobs=-1"], "bad value for 'jobs': -1 (must be an integer >= 0 and <= 4096)"),
    (["baseline=nope"], "baseline=nope is not a policy of this sweep"),
    (["quant.bits=2.5,nan"], "quant.bits=nan: bad value for 'quant.bits': nan (must be finite"),
    (["seed=x"], "bad value for 'seed'"),
])
def test_bad_inputs_one_line_exit_2(trace_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "sw"
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "cache.slots=32", *extra, f"out={out}"], capsys)
    assert message in one_line_error(rc, err)
    assert not (out / "sweep.parquet").exists()


def test_missing_out_and_missing_trace(trace_dir, tmp_path, capsys):
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "cache.slots=32"], capsys)
    assert "out=DIR is required" in one_line_error(rc, err)
    rc, _, err = run_cli(["sweep", f"trace={tmp_path / 'none'}", f"out={tmp_path / 'sw'}"], capsys)
    assert "trace folder not found" in one_line_error(rc, err)


def test_older_format_and_foreign_folders_are_refused(trace_dir, tmp_path, capsys):
    old = tmp_path / "old"
    (old / "points").mkdir(parents=True)
    (old / "sweep.yaml").write_text(yaml.safe_dump({"format_version": 0, "grid": {}}))
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", f"out={old}"], capsys)
    assert "sweep format version 0 (this version reads 1)" in one_line_error(rc, err)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", f"out={other}"], capsys)
    assert "not a sweep folder" in one_line_error(rc, err)


def test_ray_not_installed(trace_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "executor=ray", f"out={tmp_path / 'sw'}"], capsys)
    assert "pip install -e .[cluster]" in one_line_error(rc, err)
    assert not (tmp_path / "sw").exists()


def test_unreachable_ray_address(trace_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "executor=ray", f"ray.address=127.0.0.1:{port}",
                          f"out={tmp_path / 'sw'}", "progress=false"], capsys)
    assert "cannot reach a Ray cluster" in one_line_error(rc, err)
    assert time.monotonic() - t0 < 30


def test_cli_errors_have_no_traceback(trace_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sim", "sweep", f"trace={trace_dir}", "nope=1",
                           f"out={tmp_path / 'sw'}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------- SIGKILL and resume


def _sweep_cmd(trace: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sim", "sweep", f"trace={trace}", "hw=jetson.yaml,rtx4090.yaml",
            "policy=baseline,mixtral_offloading,hobbit", "cache.slots=32:256:32", f"out={out}", "jobs=2",
            "progress=false", "report=false"]


def _kill_after(cmd: list[str], out: Path, min_points: int, timeout_s: float = 120) -> int:
    """Start the sweep in its own process group; SIGKILL the group once `min_points` are done."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s and proc.poll() is None:
            done = len(list((out / "points").glob("*.json"))) if (out / "points").is_dir() else 0
            if done >= min_points:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return len(list((out / "points").glob("*.json"))) if (out / "points").is_dir() else 0


def _check_whole(out: Path) -> None:
    """Everything a killed sweep left is whole: each point file parses; the table reads."""
    for p in (out / "points").glob("*.json"):
        rec = json.loads(p.read_text())
        assert rec["key"] == p.stem and rec["summary"]["tpot_mean_s"] > 0
    if (out / "sweep.parquet").exists():
        t = pl.read_parquet(out / "sweep.parquet")
        assert t["tpot_mean_s"].null_count() == 0


def test_sigkill_midway_then_resume_equals_an_uninterrupted_sweep(slow_trace_dir, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_sweep_cmd(slow_trace_dir, full), cwd=REPO_ROOT, check=True, timeout=600,
                   capture_output=True)
    expected = pl.read_parquet(full / "sweep.parquet")
    assert expected.height == 48

    out = tmp_path / "killed"
    early = _kill_after(_sweep_cmd(slow_trace_dir, out), out, min_points=0)  # killed while starting
    if out.exists():
        _check_whole(out)
    midway = _kill_after(_sweep_cmd(slow_trace_dir, out), out, min_points=early + 6)
    assert midway < 48, "the sweep finished before it could be killed: make it longer"
    _check_whole(out)
    proc = subprocess.run(_sweep_cmd(slow_trace_dir, out), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{48 - midway} run, {midway} done before" in proc.stdout.splitlines()[-1]
    assert_frame_equal(pl.read_parquet(out / "sweep.parquet"), expected)
    assert_frame_equal(pl.read_parquet(out / "layers.parquet"), pl.read_parquet(full / "layers.parquet"))
    assert not list(out.rglob(".*.tmp"))
