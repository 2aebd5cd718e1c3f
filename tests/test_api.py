"""The Python API (`sim.run`, `sim.sweep`, `sim.load_trace`, catalogues): the same as the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import polars as pl
import pytest

import sim
from sim.cli import main as cli
from sim.errors import UserError

FAST = {"engine.max_tokens": 48}  # keep each run short


def cli_summary(capsys, tmp_path, *argv) -> dict:
    out = tmp_path / "cli"
    rc = cli(["run", *argv, f"out={out}", "report=false"])
    err = capsys.readouterr().err
    assert rc == 0, err
    return json.loads((out / "summary.json").read_text())


def same(a: dict, b: dict) -> bool:
    """Equal summaries (NaN equal to NaN, as summary.json writes it)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def cli_error(capsys, command, *argv) -> str:
    rc = cli([command, *map(str, argv)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ------------------------------------------------------------------------------------- run


def test_run_flat_and_nested_match_the_cli(tmp_path, capsys, monkeypatch):
    want = cli_summary(capsys, tmp_path, "hw=rtx4090.yaml", "policy=adapmoe", "cache.slots=64", "engine.max_tokens=48")
    monkeypatch.chdir(tmp_path / "cli")  # nothing may be written without out=
    flat = sim.run(hw="rtx4090.yaml", policy="adapmoe", **{"cache.slots": 64}, **FAST)
    nested = sim.run(hw="rtx4090.yaml", policy="adapmoe", cache={"slots": 64}, engine={"max_tokens": 48})
    assert same(flat.summary, want) and same(nested.summary, want)
    for res in (flat, nested):
        assert isinstance(res, sim.Result) and res.out is None
        assert all(isinstance(f, pl.DataFrame) for f in (res.tokens, res.layers, res.events))
        assert res.tokens.height == want["tokens_decode"] and res.config.cache["slots"] == 64
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["config.yaml", "events.parquet",
                                                                    "layers.parquet", "summary.json", "tokens.parquet"]


def test_run_with_out_writes_the_results_folder(tmp_path):
    res = sim.run(hw="jetson", out=tmp_path / "r", report=False, **FAST)
    assert res.out == tmp_path / "r"
    assert same(json.loads((tmp_path / "r" / "summary.json").read_text()), res.summary)
    with pytest.raises(UserError):  # the folder is claimed, as by the command line
        sim.run(hw="jetson", out=tmp_path / "r", report=False, **FAST)


def test_trace_and_profile_objects(tmp_path, capsys):
    from sim.trace.format import write_trace

    part = sim.load_trace("toy", sequences=2)
    assert part.path is None and len(set(part.seq.tolist())) == 2
    write_trace(part, tmp_path / "two")
    want = cli_summary(capsys, tmp_path, f"trace={tmp_path / 'two'}", "hw=rtx4090.yaml", "cache.slots=40")
    got = sim.run(trace=part, hw=sim.load_profile("rtx4090"), cache={"slots": 40})
    assert same(got.summary, want)
    assert got.config.trace.startswith("<in-memory trace") and got.config.hw.startswith("<in-memory hardware")
    by_path = sim.run(trace=tmp_path / "two", hw="rtx4090.yaml", cache={"slots": 40})
    assert same(by_path.summary, want)
    # the subset, in memory or written elsewhere, is replayed as the bundled trace is (its meta.yaml's
    # source.replay_model), never as another model because of where it lives
    from sim.machine.models import PRESETS

    assert got.summary["expert_bytes"] == by_path.summary["expert_bytes"] == PRESETS["mixtral-8x7b"].expert_bytes


@pytest.mark.parametrize("keys, argv", [
    ({"foo": 1}, ["foo=1"]),
    ({"cache": {"nope": 1}}, ["cache.nope=1"]),
    ({"cache.slots": 2.5}, ["cache.slots=2.5"]),
    ({"quant": {"bits": 0}}, ["quant.bits=0"]),
    ({"seed": -1}, ["seed=-1"]),
    ({"policy": "nope"}, ["policy=nope"]),
    ({"hw": "no/such/profile.yaml"}, ["hw=no/such/profile.yaml"]),
    ({"engine": {"staging_buffers": 1}}, ["engine.staging_buffers=1"]),
])
def test_errors_are_the_clis(tmp_path, capsys, monkeypatch, keys, argv):
    monkeypatch.chdir(tmp_path)
    want = cli_error(capsys, "run", *argv, "out=never-written")
    with pytest.raises(UserError) as err:
        sim.run(**keys)
    assert one_line(err.value) == want


def test_values_are_typed_as_python_gives_them():
    from sim.api import to_argv

    argv = to_argv({"gating": {"T": 0.005, "sensitivity": "1e-3"}, "name": "yes", "cache.sizes": [1, 2],
                    "oracle": True, "seed": 3, "prefetch.accuracy": None, "trace": "x y"})
    assert argv == ["gating.T=0.005", 'gating.sensitivity="1e-3"', "name=yes", "cache.sizes=[1, 2]",
                    "oracle=true", "seed=3", "prefetch.accuracy=null", "trace=x y"]
    with pytest.raises(UserError, match="given twice"):
        to_argv({"cache": {"slots": 1}, "cache.slots": 2})
    with pytest.raises(UserError, match="is not a value a key can take"):
        to_argv({"seed": object()})


def test_a_string_stays_a_string():
    res = sim.run(name="yes", hw="rtx4090", cache={"slots": 64}, **FAST)
    assert res.config.name == "yes"  # not the bool true
    with pytest.raises(UserError, match="1e-3"):  # a file name, never the number 0.001
        sim.run(policy="adapmoe", hw="rtx4090", **{"gating.sensitivity": "1e-3"}, **FAST)


def test_bad_object_arguments():
    with pytest.raises(UserError, match="trace= must be"):
        sim.run(trace=3)
    with pytest.raises(UserError, match="sequences must be"):
        sim.load_trace("toy", sequences=0)
    with pytest.raises(UserError, match="trace folder not found|not found"):
        sim.load_trace("no-such-trace")


# ----------------------------------------------------------------------------------- sweep


def test_sweep_returns_one_row_per_point(tmp_path):
    table = sim.sweep({"hw": "rtx4090.yaml", "policy": ["baseline", "mixtral_offloading"],
                       "cache": {"slots": [32, 64]}, "engine.max_tokens": 24}, jobs=1)
    assert isinstance(table, pl.DataFrame) and table.height == 4
    assert table["policy"].to_list() == ["baseline", "baseline", "mixtral_offloading", "mixtral_offloading"]
    assert table["cache.slots"].to_list() == [32, 64, 32, 64] and table["error"].is_null().all()
    one = sim.run(hw="rtx4090.yaml", policy="baseline", cache={"slots": 64}, engine={"max_tokens": 24})
    assert table["tpot_mean_s"][1] == one.summary["tpot_mean_s"]
    kept = sim.sweep(["policy=baseline", "cache.slots=32:64:32", "engine.max_tokens=24"], tmp_path / "sw", jobs=1)
    assert kept.height == 2 and (tmp_path / "sw" / "sweep.parquet").is_file() and (tmp_path / "sw" / "report.html").is_file()


def test_sweep_refuses_its_own_options_in_the_grid():
    with pytest.raises(UserError, match="option of the sweep"):
        sim.sweep({"policy": "baseline", "jobs": 2})
    with pytest.raises(UserError, match="option of the sweep"):
        sim.sweep(["policy=baseline", "ray.address=auto"])
    with pytest.raises(UserError, match="sweep takes no overwrite="):  # the command line's message
        sim.sweep({"policy": "baseline", "overwrite": True})
    with pytest.raises(UserError, match="unknown key 'nope'"):
        sim.sweep({"nope": [1, 2]})


def test_sim_sweep_is_callable_and_still_the_package():
    import sim.sweep as pkg
    from sim.sweep import run_sweep

    assert sim.sweep is pkg and callable(sim.sweep) and sim.sweep.run_sweep is run_sweep


# ------------------------------------------------------------------------------ catalogues


def listed(capsys, part: str) -> list[str]:
    assert cli(["list", part]) == 0
    return capsys.readouterr().out.splitlines()


def test_catalogues_list_what_sim_list_lists(capsys):
    fams: dict[str, list[str]] = {}
    for line in listed(capsys, "policies")[1:]:
        if re.fullmatch(r"  (\w+):", line):
            fam = fams.setdefault(line.strip().rstrip(":"), [])
        elif re.match(r"    [^ (]", line):
            fam.append(line.split()[0])
    assert sim.policies() == fams
    presets = [line.split()[0] for line in listed(capsys, "presets")[1:] if re.match(r"  \S+\s+gating=", line)]
    assert sorted(sim.presets()["policies"]) == sorted(presets)
    (line,) = listed(capsys, "hardware")
    assert sim.profiles() == line.removeprefix("hardware profiles: ").split(", ")
    models = [line.split()[0] for line in listed(capsys, "models")[1:]]
    assert list(sim.presets()["models"]) == models
    (line,) = listed(capsys, "traces")
    assert sim.traces() == line.removeprefix("traces: ").split(", ")
    m = sim.presets()["models"]["mixtral-8x7b"]
    assert (m["layers"], m["experts"], m["top_k"]) == (32, 8, 2) and m["expert_bytes"] > 0
    assert sim.presets()["policies"]["adapmoe"]["gating"]["name"] == "adapmoe"


def test_import_sim_stays_light():
    code = ("import sys, sim; heavy = [m for m in ('sim.api', 'sim.runner', 'polars', 'torch', 'numpy') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
