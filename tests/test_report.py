"""`python -m sim report`: the figures' numbers, the page, and (where Chromium exists) that it renders
without JavaScript errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.sweep import run_sweep
from sim.sweep.report import pareto_mask, pick_baseline, report_html, speedup_table
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A sweep folder (with one failing point) and a run folder."""
    base = tmp_path_factory.mktemp("rep")
    trace = base / "trace"
    write_trace(random_trace(np.random.default_rng(0), tokens=20, prefill=4, layers=32, locality=0.4,
                             name="mixtral-8x7b"), trace)
    grid = {"trace": str(trace), "hw": ["jetson.yaml", "rtx4090.yaml"],
            "policy": ["baseline", "mixtral_offloading", "adapmoe", "hobbit"], "cache.slots": [8, 32, 64]}
    res = run_sweep(grid, base / "sweep", jobs=1, progress=False)
    assert res.failed == 2  # adapmoe with 8 slots over 32 layers, on both profiles
    run = base / "run"
    assert main(["run", f"trace={trace}", "hw=rtx4090.yaml", "cache.slots=48", f"out={run}"]) == 0
    return {"sweep": base / "sweep", "run": run, "trace": trace}


def test_pareto_mask_small():
    x = np.array([0.0, 0.0, 1.0, 2.0, 1.0])
    y = np.array([5.0, 6.0, 3.0, 3.0, 4.0])
    assert pareto_mask(x, y).tolist() == [True, False, True, False, False]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=20))
def test_pareto_mask_matches_definition(pts):
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    m = pareto_mask(x, y)
    for i in range(len(pts)):
        dominated = any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(pts)))
        assert m[i] == (not dominated)


def test_speedup_is_baseline_over_policy(folders):
    t = pl.read_parquet(folders["sweep"] / "sweep.parquet")
    assert pick_baseline(t) == "mixtral_offloading"
    assert pick_baseline(t, "baseline") == "baseline"
    sp = speedup_table(t, "mixtral_offloading")
    assert sp.filter(pl.col("policy") == "mixtral_offloading")["speedup"].to_list() == [1.0] * 6
    row = sp.filter((pl.col("policy") == "hobbit") & (pl.col("hw_label") == "jetson")
                    & (pl.col("cache_slots") == 32)).row(0, named=True)
    tp = {p: t.filter((pl.col("policy") == p) & (pl.col("hw") == "jetson.yaml")
                      & (pl.col("cache.slots") == 32))["tpot_mean_s"][0] for p in ("hobbit", "mixtral_offloading")}
    assert row["speedup"] == pytest.approx(tp["mixtral_offloading"] / tp["hobbit"])
    assert sp.filter(pl.col("policy") == "adapmoe").height == 4  # its 8-slot points failed


def test_page_is_self_contained_with_every_figure(folders):
    from plotly.offline import get_plotlyjs

    page = report_html([folders["sweep"], folders["run"]])
    assert get_plotlyjs() in page  # plotly.js inlined: the page opens offline
    assert re.search(r"<script[^>]*\ssrc=[\"']?https?:", page) is None
    for fig in ("pareto", "tpot-vs-cache", "speedup", "hit-rate", "timeline"):
        assert f'id="fig-{fig}-' in page, fig
    assert "Failed points (2)" in page and "does not fit 8 slots" in page
    assert "adapmoe vs mixtral_offloading" in page


def test_sweep_writes_its_report(folders):
    assert 'id="fig-pareto-' in (folders["sweep"] / "report.html").read_text()


def test_report_command(folders, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(folders["sweep"]), str(folders["run"]), f"out={out}", "baseline=baseline"]) == 0
    assert out.is_file() and "Speedup over baseline" in out.read_text()
    capsys.readouterr()
    for args, message in [
        ([], "give one or more sweep or run folders"),
        ([str(tmp_path / "nope")], "folder not found"),
        ([str(tmp_path)], "neither a sweep folder"),
        ([str(folders["sweep"]), "baseline=lru"], "baseline=lru is not a policy of the table"),
        ([str(folders["sweep"]), f"out={tmp_path / 'no' / 'r.html'}"], "not a file path in an existing folder"),
        ([str(folders["sweep"]), "colour=red"], "unknown key 'colour'"),
    ]:
        rc = main(["report", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and message in err, (args, err)


# ----------------------------------------------------------------------- headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom"]


def render(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, console messages) of `page` in headless Chromium."""
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium_without_errors(folders, tmp_path):
    bad = tmp_path / "bad.html"  # the check itself sees an error when there is one
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    _, console = render(bad, tmp_path)
    assert any("Uncaught Error: boom" in line for line in console)

    page = tmp_path / "report.html"
    page.write_text(report_html([folders["sweep"], folders["run"]]))
    dom, console = render(page, tmp_path)
    assert console == [], console
    divs = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(divs) == 5, divs  # every figure was drawn by plotly.js (js-plotly-plot is set on render)
    assert dom.count('class="main-svg"') >= 5
