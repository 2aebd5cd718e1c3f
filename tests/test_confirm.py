"""`python -m sim confirm`: realrun beside run on two tiny arms; table, parquet, figure, verdict."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("torch")

from sim.cli import main  # noqa: E402
from sim.synthetic import random_trace  # noqa: E402
from sim.trace import write_trace  # noqa: E402

TINY = ["model=toy-mixtral", "layers=4", "tokens=8", "slots=12", "progress=false"]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cf") / "synth"
    write_trace(random_trace(np.random.default_rng(2), tokens=10, layers=32, locality=0.4), d)
    return d


def test_confirm_two_arms_with_a_given_profile(trace_dir, tmp_path, capsys):
    out = tmp_path / "confirm"
    rc = main(["confirm", "profile=rtx4090", "store=host", "arms=baseline,half", f"trace={trace_dir}", *TINY,
               "repeats=2", f"out={out}"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    frame = pl.read_parquet(out / "confirm.parquet")
    assert frame["arm"].to_list() == ["baseline", "baseline_half_cache"]
    assert frame["cache_slots"].to_list() == [12, 6]
    for m in ("tpot_mean_s", "tpot_p90_s", "stall_share", "hit_rate"):
        assert frame[f"measured_{m}"].is_finite().all() and frame[f"simulated_{m}"].is_finite().all()
    rel = (frame["simulated_tpot_mean_s"] - frame["measured_tpot_mean_s"]) / frame["measured_tpot_mean_s"]
    assert np.allclose(rel.to_numpy(), frame["error_tpot_mean_s"].to_numpy())
    # timing-independent counters agree exactly (no prefetch)
    assert frame["measured_hit_rate"].to_list() == frame["simulated_hit_rate"].to_list()
    v = json.loads((out / "confirm.json").read_text())["verdict"]
    assert {"median_abs_error_tpot_mean", "max_abs_error_tpot_mean", "kendall_tau", "ranking_identical"} <= set(v)
    assert "y = x" in (out / "confirm.html").read_text()
    for arm in ("baseline", "baseline_half_cache"):
        assert (out / arm / "realrun" / "summary.json").is_file() and (out / arm / "sim" / "summary.json").is_file()
    assert "Kendall tau" in stdout and "median" in stdout


def test_confirm_calibrates_first(trace_dir, tmp_path, capsys):
    out = tmp_path / "confirm"
    rc = main(["confirm", "calibrate", "quick=true", "cal_repeats=3", "arms=baseline,mixtral_offloading",
               f"trace={trace_dir}", *TINY, f"store_dir={tmp_path / 'store'}", f"out={out}"])
    assert rc == 0, capsys.readouterr().err
    from sim.hardware import load_profile

    assert load_profile(str(out / "profile.yaml")).expert_tier == "storage"
    assert pl.read_parquet(out / "confirm.parquet").height == 2


@pytest.mark.parametrize("args,needle", [
    (["profile=README.md"], "README.md"),
    (["profile=rtx4090"], "no storage_to_device link"),
    (["arms=baseline"], "at least two arms"),
    (["arms=baseline,nonsense"], "unknown arm"),
    (["device=cuda"], "cuda"),
])
def test_confirm_bad_inputs(trace_dir, tmp_path, capsys, args, needle):
    import torch

    from sim import REPO_ROOT

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [f"profile={REPO_ROOT / 'hwprofiles' / 'README.md'}" if a == "profile=README.md" else a for a in args]
    out = tmp_path / "c"
    rc = main(["confirm", *args, f"trace={trace_dir}", *TINY, f"out={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
