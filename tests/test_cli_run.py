"""`python -m sim run` end to end, and its bad inputs (one line, exit 2, no results folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sim import REPO_ROOT
from sim.cli import main
from sim.results.metrics import SUMMARY_KEYS
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tr") / "synth"
    write_trace(random_trace(np.random.default_rng(0), tokens=40, prefill=8, sequences=2, layers=32,
                             locality=0.4, name="mixtral-8x7b"), d)  # a Mixtral-8x7B-shaped routing, named so
    return d


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_writes_results(trace_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc, stdout, _ = run_cli(["run", "hw=jetson.yaml", f"trace={trace_dir}", f"out={out}"], capsys)
    assert rc == 0
    for f in ("config.yaml", "summary.json", "tokens.parquet", "layers.parquet", "events.parquet", "report.html"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["tokens_decode"] == 80
    assert pl.read_parquet(out / "tokens.parquet").height == 80
    assert pl.read_parquet(out / "layers.parquet").height == 32
    assert "tpot_mean_s" in stdout and "hit_rate" in stdout


def test_run_deterministic(trace_dir, tmp_path, capsys):
    sums = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert run_cli(["run", "hw=rtx4090", f"trace={trace_dir}", f"out={out}", "cache.slots=64", "report=false"],
                       capsys)[0] == 0
        sums.append(json.loads((out / "summary.json").read_text()))
    assert sums[0] == sums[1]


@pytest.mark.parametrize("args,needle", [
    (["hw=missing.yaml"], "not found"),
    (["cache.slots=abc"], "cache.slots"),
    (["nosuchkey=1"], "valid keys"),
    (["cache.slots=1"], "one layer needs"),
    (["model=olmoe-1b-7b"], "does not match"),
    (["policy=nope"], "known:"),
    (["gating.name=nope"], "known:"),
    (["prefetch.nope=1"], "valid:"),
    (["trace=/nonexistent/trace"], "not found"),
])
def test_run_bad_inputs(trace_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    argv = ["run", "hw=jetson.yaml", f"trace={trace_dir}", f"out={out}"]
    argv = [a for a in argv if a.split("=")[0] not in {x.split("=")[0] for x in args}] + args
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists()


def test_bad_yaml_and_zero_bandwidth(trace_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: [unclosed\n")
    rc, _, err = run_cli(["run", f"hw={bad}", f"trace={trace_dir}", f"out={tmp_path / 'x'}"], capsys)
    assert rc == 2 and err.count("\n") == 1
    good = (REPO_ROOT / "hwprofiles" / "rtx4090.yaml").read_text()
    zero = tmp_path / "zero.yaml"
    import re

    zero.write_text(re.sub(r"(    bandwidth_Bps:\s*\n\s*value:\s*)[0-9.eE+]+", r"\g<1>0", good, count=1))
    assert zero.read_text() != good
    rc, _, err = run_cli(["run", f"hw={zero}", f"trace={trace_dir}", f"out={tmp_path / 'y'}"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "bandwidth" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_no_traceback_via_subprocess(trace_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "sim", "run", "hw=jetson.yaml", f"trace={trace_dir}",
                        "cache.slots=abc", f"out={tmp_path / 'z'}"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_list(capsys):
    rc, out, _ = run_cli(["list"], capsys)
    assert rc == 0 and "jetson" in out and "pregate" in out and "mixtral-8x7b" in out


@pytest.mark.parametrize("command", ["run", "realrun", "confirm", "calibrate", "sweep"])
def test_command_help_prints_its_keys(command, capsys):
    rc, out, _ = run_cli([command, "--help"], capsys)
    assert rc == 0
    assert out.startswith(f"`python -m sim {command}")  # the command module's docstring, keys included
    assert "=" in out


def test_default_run_on_bundled_trace(tmp_path, capsys):
    """The README's main job: only `hw` given; the bundled trace, preset and policy are defaults."""
    out = tmp_path / "default"
    rc, stdout, _ = run_cli(["run", "hw=jetson.yaml", f"out={out}", "report=false"], capsys)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_decode"] == 2048 and s["cache_slots"] == 84 and 0 < s["hit_rate"] < 1
    assert s["ttft_s"] > 0 and s["tpot_mean_s"] > 0
