"""`python -m sim confirm`: realrun beside run on two tiny arms; table, parquet, figure, verdict."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("torch")

from sim.cli import main  # noqa: E402
from sim.trace.format import write_trace  # noqa: E402
from sim.trace.synthetic import random_trace  # noqa: E402

TINY = ["model=toy-mixtral", "layers=4", "tokens=8", "slots=12", "progress=false"]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cf") / "synth"
    write_trace(random_trace(np.random.default_rng(2), tokens=10, layers=32, locality=0.4), d)
    return d


def _confirm_given_profile(trace_dir, out, arms: str, capsys) -> tuple[str, pl.DataFrame]:
    """`confirm` of `arms` on the rtx4090 profile (no calibration), two rounds: (stdout, confirm.parquet)."""
    rc = main(["confirm", "profile=rtx4090", "store=host", f"arms={arms}", f"trace={trace_dir}", *TINY,
               "repeats=2", f"out={out}"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    return stdout, pl.read_parquet(out / "confirm.parquet")


def test_confirm_two_arms_with_a_given_profile(trace_dir, tmp_path, capsys):
    out = tmp_path / "confirm"
    stdout, frame = _confirm_given_profile(trace_dir, out, "baseline,half", capsys)
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
    # no calibration in this confirm: no link diagnostic, and it falls back to the headline simulation
    assert frame["link_speed_factor"].null_count() == 2
    assert frame["simulated_run_link_tpot_mean_s"].to_list() == frame["simulated_tpot_mean_s"].to_list()
    assert v["median_abs_error_tpot_mean_run_link"] is None and "diagnostic" not in stdout


def test_confirm_batched_arms(trace_dir, tmp_path, capsys):
    """A batched arm (closed loop of N users) runs the serving workload for real and simulated; its
    errors are the verdict's `_batched` keys, apart from the replay arms' ranking."""
    out = tmp_path / "confirm"
    stdout, frame = _confirm_given_profile(trace_dir, out, "baseline,half,batch2", capsys)
    assert frame["arm"].to_list() == ["baseline", "baseline_half_cache", "baseline_batch2"]
    assert frame["users"].to_list() == [0, 0, 2]
    b = frame.filter(pl.col("users") == 2).row(0, named=True)
    for m in ("tpot_mean_s", "tpot_p90_s", "throughput_tokens_per_s"):
        assert b[f"measured_{m}"] > 0 and b[f"simulated_{m}"] > 0
        assert b[f"error_{m}"] == pytest.approx((b[f"simulated_{m}"] - b[f"measured_{m}"]) / b[f"measured_{m}"])
    assert b["measured_stall_share"] is None and b["measured_hit_rate"] is None
    sim_req = pl.read_parquet(out / "baseline_batch2" / "sim" / "requests.parquet")
    real_req = pl.read_parquet(out / "baseline_batch2" / "realrun" / "requests.parquet")
    assert sim_req.height == real_req.height == 4
    assert sim_req["output_tokens"].to_list() == real_req["output_tokens"].to_list()
    assert b["simulated_tpot_mean_s"] == pytest.approx(float(sim_req["tpot_mean_s"].mean()))
    v = json.loads((out / "confirm.json").read_text())["verdict"]
    assert v["batched_arms"] == ["baseline_batch2"]
    assert v["median_abs_error_throughput_batched"] == pytest.approx(abs(b["error_throughput_tokens_per_s"]))
    assert set(v["ranking_measured"]) == {"baseline", "baseline_half_cache"}  # the replay arms only
    assert "batched arms" in stdout and "over 2 replay arms" in stdout


def test_a_batched_arm_needs_two_decode_tokens():
    from sim.errors import UserError
    from sim.realrun.confirm import ConfirmOptions, parse_arms

    with pytest.raises(UserError, match="tokens >= 2"):
        parse_arms("baseline,batch2", ConfirmOptions(tokens=1))
    assert parse_arms("baseline,batch2", ConfirmOptions(tokens=2))[1].users == 2


def test_confirm_calibrates_first(trace_dir, tmp_path, capsys):
    out = tmp_path / "confirm"
    rc = main(["confirm", "calibrate", "quick=true", "cal_repeats=3", "arms=baseline,mixtral_offloading",
               f"trace={trace_dir}", *TINY, f"store_dir={tmp_path / 'store'}", f"out={out}"])
    assert rc == 0, capsys.readouterr().err
    from sim.machine.hardware import load_profile

    assert load_profile(str(out / "profile.yaml")).expert_tier == "storage"
    frame = pl.read_parquet(out / "confirm.parquet")
    assert frame.height == 2
    # the diagnostic: every arm copied experts, so each has the speed of its copies against calibration's
    assert frame["link_speed_factor"].null_count() == 0 and (frame["link_speed_factor"] > 0).all()
    rel = frame["simulated_run_link_tpot_mean_s"] / frame["measured_tpot_mean_s"] - 1
    assert np.allclose(rel.to_numpy(), frame["error_run_link_tpot_mean_s"].to_numpy())
    meta = json.loads((out / "confirm.json").read_text())
    v = meta["verdict"]
    assert v["median_abs_error_tpot_mean_run_link"] >= 0
    # bracketed by a session before the first round and one after the last, a probe before every run
    assert meta["calibration_sessions"] == 2 and meta["machine_probes"] == 2 * meta["repeats"]
    # the measurement's own noise: standard error of each arm's mean over its runs
    sem = frame["measured_tpot_mean_s_rel_sem"].to_numpy()
    assert (sem > 0).all() and v["max_rel_sem_tpot_mean"] == pytest.approx(sem.max())
    assert "with the link as each run met it" in capsys.readouterr().out


def test_run_link_diagnostic_scales_the_link(trace_dir):
    """A run whose copies took as long as calibration's is simulated as the headline; one whose
    copies took twice as long, with every transfer twice as long (a slower token)."""
    from types import SimpleNamespace

    from sim.config import parse_run_config
    from sim.machine.hardware import load_profile
    from sim.realrun.confirm import run_link_tpot_s, with_link_speed
    from sim.runner import load_trace, simulate

    hw = load_profile("rtx4090")
    slow = with_link_speed(hw, 2.0)
    link, slow_link = hw.links["host_to_device"], slow.links["host_to_device"]
    assert slow_link.latency_s == 2 * link.latency_s and slow_link.bandwidth_Bps == link.bandwidth_Bps / 2
    cfg = parse_run_config(["model=toy-mixtral", "cache.slots=12", "engine.prefill=false", "policy=baseline"])
    tr = load_trace(str(trace_dir))
    headline = float(simulate(cfg, trace=tr, hw=hw).summary["tpot_mean_s"])
    same = SimpleNamespace(summary={"realrun_copy_mean_s": 0.004})
    assert run_link_tpot_s(cfg, tr, hw, same, 0.004, headline) == (headline, 1.0)
    slower, factor = run_link_tpot_s(cfg, tr, hw, SimpleNamespace(summary={"realrun_copy_mean_s": 0.008}), 0.004,
                                     headline)
    assert factor == 2.0 and slower > 1.1 * headline
    none = SimpleNamespace(summary={"realrun_copy_mean_s": None})
    assert run_link_tpot_s(cfg, tr, hw, none, 0.004, headline) == (headline, None)


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


def test_gpu_script_commands_parse(tmp_path, capsys):
    """The prepared GPU check (scripts/gpu_confirm.sh) is run once, on a lent GPU, with no second
    chance: each `python -m sim` line in it must get past argument parsing. Without a GPU each
    stops at the one-line CUDA refusal (exit 2), which comes after every key was checked."""
    import re
    import shlex

    import torch

    from sim import REPO_ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    text = (REPO_ROOT / "scripts" / "gpu_confirm.sh").read_text()
    lines = [m.group(1) for m in re.finditer(r'-m sim ([^\n|]+?)(?: 2>&1|$)', text, re.M)]
    assert len(lines) == 2
    for line in lines:
        args = [a.replace('"$out/', f'{tmp_path}/').replace('"$full"', str(tmp_path / "full")).strip('"')
                for a in shlex.split(line.replace('"', ''), posix=True)]
        args = [a.replace("$out/", f"{tmp_path}/").replace("$full", str(tmp_path / "full")) for a in args]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and "no CUDA GPU" in err, (args, err)


def test_an_arms_measured_figures_are_means_over_its_runs():
    """Runs spread over the confirm average over the machine's drift: mean TPOT and the other
    figures are means over runs, the p90 is over every token of every run."""
    from types import SimpleNamespace

    from sim.realrun.confirm import measured_over_runs

    def run(lat, stall):
        return SimpleNamespace(tokens=pl.DataFrame({"latency_s": lat}), requests=None,
                               summary={"tpot_mean_s": float(np.mean(lat)), "stall_share": stall})

    runs = [run([1.0, 1.0, 1.0, 1.0], 0.5), run([1.0, 1.0, 1.0, 1.0], 0.5), run([4.0, 4.0, 4.0, 4.0], 0.8)]
    assert measured_over_runs(runs, "tpot_mean_s") == pytest.approx(2.0)  # the median of runs would say 1.0
    assert measured_over_runs(runs, "stall_share") == pytest.approx(0.6)
    assert measured_over_runs(runs, "tpot_p90_s") == pytest.approx(4.0)


def test_only_pairs_the_measurement_separates_count_against_the_ranking():
    """Arms within two standard errors of each other have no measured order: the simulator may
    order them either way; a separated pair ordered the other way counts."""
    from sim.realrun.confirm import verdict

    frame = pl.DataFrame({"arm": ["a", "b", "c"], "measured_tpot_mean_s": [1.00, 1.01, 2.0],
                          "simulated_tpot_mean_s": [1.05, 0.95, 2.1], "error_tpot_mean_s": [0.05, -0.06, 0.05],
                          "error_tpot_p90_s": [0.0, 0.0, 0.0], "measured_tpot_mean_s_rel_sem": [0.02, 0.02, 0.02]})
    v = verdict(frame)
    assert not v["ranking_identical"]  # a and b swapped...
    assert v["pairs_separated"] == 2 and v["pairs_separated_disagreeing"] == 0  # ...but they are a tie
    frame = frame.with_columns(pl.Series("simulated_tpot_mean_s", [2.2, 0.95, 2.1]))
    assert verdict(frame)["pairs_separated_disagreeing"] == 1  # a above c: separated, and wrong
