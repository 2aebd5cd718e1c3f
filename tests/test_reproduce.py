"""A run's own `config.yaml` runs it again (the same numbers), `overwrite=` where a folder is
written, and a folder's own files never replaced by the wrong kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sim.cli import main
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tr") / "synth"
    write_trace(random_trace(np.random.default_rng(2), tokens=24, prefill=4, sequences=2, layers=32,
                             locality=0.4), d)
    return d


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


ARGS = ["hw=rtx4090.yaml", "model=mixtral-8x7b", "policy=adapmoe_yield", "cache.slots=56", "gating.T_miss=0.004",
        "seed=7", "engine.pipelining=true", "quant.bits=3", "name=repro"]


@pytest.fixture(scope="module")
def first_run(trace_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "first"
    assert main(["run", f"trace={trace_dir}", *ARGS, f"out={out}"]) == 0
    return out


def test_a_runs_config_reruns_it_exactly(first_run, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in first_run.iterdir()}
    again = tmp_path / "again"
    rc, _, err = run_cli(["run", f"config={first_run / 'config.yaml'}", f"out={again}"], capsys)
    assert rc == 0, err
    assert json.loads((again / "summary.json").read_text()) == json.loads((first_run / "summary.json").read_text())
    a, b = (yaml.safe_load((d / "config.yaml").read_text()) for d in (first_run, again))
    a.pop("out"), b.pop("out")
    assert a == b  # the same resolved configuration, provenance included
    assert {p.name: p.read_bytes() for p in first_run.iterdir()} == before  # the original is untouched


def test_a_rerun_without_out_writes_a_new_folder(first_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["run", f"config={first_run / 'config.yaml'}", "report=false"], capsys)
    assert rc == 0, err
    made = list((tmp_path / "results").glob("*-repro"))  # the recorded out= is not reused
    assert len(made) == 1
    assert json.loads((made[0] / "summary.json").read_text()) == json.loads((first_run / "summary.json").read_text())


def test_key_value_pairs_apply_on_top_of_a_runs_config(first_run, tmp_path, capsys):
    rc, _, err = run_cli(["run", f"config={first_run / 'config.yaml'}", "cache.slots=64", f"out={tmp_path / 'o'}",
                          "report=false"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["cache_slots"] == 64


@pytest.mark.parametrize("resolved,needle", [
    ({"results_format": 99}, "was written by results format 99; this version reads 1"),
    (3, "'resolved' is the record of what a run resolved to"),
    ({"sim_version": "x"}, "'resolved' is the record of what a run resolved to"),
])
def test_the_recorded_provenance_is_checked(first_run, tmp_path, capsys, resolved, needle):
    cfg = yaml.safe_load((first_run / "config.yaml").read_text())
    cfg["resolved"] = resolved
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(["run", f"config={path}", f"out={tmp_path / 'o'}"], capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_another_versions_config_reruns_with_a_note(first_run, tmp_path, capsys):
    cfg = yaml.safe_load((first_run / "config.yaml").read_text())
    cfg["resolved"]["sim_version"] = "0.0.1"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(["run", f"config={path}", f"out={tmp_path / 'o'}", "report=false"], capsys)
    assert rc == 0 and "written by sim 0.0.1" in err


# --------------------------------------------------------------------------------- overwrite=


def test_run_overwrite_is_the_key_the_message_names(trace_dir, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["run", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.slots=48", f"out={out}",
            "report=false"]
    assert run_cli(base, capsys)[0] == 0
    (out / "mine.txt").write_text("kept until the new folder is whole")
    rc, _, err = run_cli(base, capsys)
    assert rc == 2 and "pass overwrite=true" in err
    assert (out / "mine.txt").is_file()
    rc, _, err = run_cli([*base, "overwrite=true", "cache.slots=64"], capsys)
    assert rc == 0, err
    assert not (out / "mine.txt").exists() and json.loads((out / "summary.json").read_text())["cache_slots"] == 64
    assert not list(tmp_path.glob(".o.*"))  # no temporary or old folder left beside it


def test_overwrite_replaces_only_an_earlier_results_folder(trace_dir, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("not a results folder")
    rc, _, err = run_cli(["run", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.slots=48",
                          f"out={folder}", "overwrite=true", "report=false"], capsys)
    assert rc == 2 and "holds no summary.json: it is not an earlier output of this command" in err
    assert (folder / "thesis.tex").is_file()


def test_a_failed_overwrite_keeps_the_old_folder(trace_dir, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["run", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", f"out={out}", "report=false"]
    assert run_cli([*base, "cache.slots=48"], capsys)[0] == 0
    before = (out / "summary.json").read_bytes()
    rc, _, err = run_cli([*base, "cache.slots=1", "overwrite=true"], capsys)  # refused: smaller than one layer
    assert rc == 2 and "one layer needs" in err
    assert (out / "summary.json").read_bytes() == before and not list(tmp_path.glob(".o.*"))


def test_sweep_says_why_it_takes_no_overwrite(trace_dir, tmp_path, capsys):
    rc, _, err = run_cli(["sweep", f"trace={trace_dir}", "cache.slots=48", f"out={tmp_path / 's'}", "overwrite=true"],
                         capsys)
    assert rc == 2 and "rerunning the same command resumes" in err and "new out=" in err


def test_confirm_takes_overwrite():
    from sim.args import parse_args
    from sim.commands.confirm import ConfirmCommandOptions

    opts = parse_args(ConfirmCommandOptions, ["overwrite=true", "tokens=4"], allow_config_file=False)
    assert opts.overwrite is True and opts.tokens == 4


# ----------------------------------------------------------------- the printed summary table


def test_summary_table_shows_values_in_the_unit_of_their_key(trace_dir, tmp_path, capsys):
    rc, out, _ = run_cli(["run", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.slots=48",
                          f"out={tmp_path / 'o'}", "report=false"], capsys)
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
    assert rows["tpot_mean_s"][1] == "s" and float(rows["tpot_mean_s"][0]) == pytest.approx(
        summary["tpot_mean_s"], rel=1e-4)
    assert "prefetch_accuracy" in rows
    keys = list(rows)
    assert keys.index("prefetch_accuracy") == keys.index("prefetch_late") + 1


# ------------------------------------------------ report: a folder's own report, of its own kind


def test_report_of_a_run_folder_is_its_run_report(first_run, tmp_path, capsys):
    own = (first_run / "report.html").read_text()
    assert "TPOT CDF" in own
    (first_run / "report.html").unlink()
    rc, _, err = run_cli(["report", str(first_run)], capsys)
    assert rc == 0, err
    page = (first_run / "report.html").read_text()
    assert "TPOT CDF" in page and "Sweep report" not in page and "Pareto front" not in page


def test_a_report_of_several_folders_never_replaces_a_folders_own(first_run, tmp_path, capsys):
    before = (first_run / "report.html").read_bytes() if (first_run / "report.html").exists() else None
    rc, _, err = run_cli(["report", str(first_run), str(first_run), f"out={first_run / 'report.html'}"], capsys)
    assert rc == 2 and "own report" in err and "out=FILE.html" in err
    after = (first_run / "report.html").read_bytes() if (first_run / "report.html").exists() else None
    assert before == after
