"""Defaults that work for every preset: `python -m sim run model=X trace=T` on a routing log of each
shipped preset's shape (staging buffers follow top-k, the modelled pre-gating says what it assumes),
and AdapMoE's gating aimed at a single-expert share whatever the sensitivities' scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from policies.gating.adapmoe import DEFAULT_TARGET_SHARE, drop_plan, single_costs, solve_T
from policies.prefetch.pregate import FALLBACK_ACCURACY
from sim.cli import main as cli
from sim.config import parse_run_config
from sim.machine.models import PRESETS
from sim.runner import simulate
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace, routing_trace

#: the bundled profile each preset is run on: the Jetson where the model's resident weights leave
#: room for a layer's experts, else the smallest that does
FITS_ON = {"mixtral-8x22b": "rtx4090.yaml", "deepseek-v3": "h200.yaml", "qwen3-235b-a22b": "rtx4090.yaml"}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A routing-only log (no pre-gating, no sensitivities) of each preset's shape."""
    base = tmp_path_factory.mktemp("logs")
    out = {}
    for name, p in PRESETS.items():
        write_trace(routing_trace(np.random.default_rng(0), tokens=6, layers=p.layers, experts=p.experts,
                                  top_k=p.top_k), base / name)
        out[name] = base / name
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_default_policy_runs_every_presets_shape(logs, tmp_path, capsys, name):
    hw = FITS_ON.get(name, "jetson.yaml")
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "run", f"model={name}", f"trace={logs[name]}", f"hw={hw}", f"out={out}",
                          "report=false")
    assert rc == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert cfg["engine"]["staging_buffers"] == max(6, 2 * PRESETS[name].top_k)  # recorded as resolved
    assert summary["prefetch_modelled"] is True  # a routing-only log: no pregate_1
    said = summary["prefetch_modelled_assumption"]
    if name == "mixtral-8x7b":
        assert "published per-layer pre-gating accuracy of mixtral-8x7b" in said
    else:
        assert f"no published pre-gating accuracy for model {name!r}" in said and str(FALLBACK_ACCURACY) in said


def test_a_device_too_small_says_what_filled_it(logs, tmp_path, capsys):
    rc, _, err = run(capsys, "run", "model=deepseek-v3", f"trace={logs['deepseek-v3']}", "hw=jetson.yaml",
                     f"out={tmp_path / 'o'}")
    assert rc == 2 and "resident weights" in err and "leave room for 0 expert(s)" in err


def test_explicit_staging_buffers_are_still_checked(logs, tmp_path, capsys):
    rc, _, err = run(capsys, "run", "model=olmoe-1b-7b", f"trace={logs['olmoe-1b-7b']}", "engine.staging_buffers=6",
                     f"out={tmp_path / 'o'}")
    assert rc == 2 and "engine.staging_buffers=6 must be >= top_k (8)" in err
    cfg = parse_run_config(["model=olmoe-1b-7b", f"trace={logs['olmoe-1b-7b']}", "engine.staging_buffers=12"])
    assert cfg.engine.staging_buffers == 12


def test_published_accuracy_asked_for_is_never_replaced(logs, tmp_path, capsys):
    rc, _, err = run(capsys, "run", "model=olmoe-1b-7b", f"trace={logs['olmoe-1b-7b']}", "prefetch.accuracy=published",
                     f"out={tmp_path / 'o'}")
    assert rc == 2 and "no published adapmoe data for model 'olmoe-1b-7b'" in err
    rc, _, err = run(capsys, "run", "model=olmoe-1b-7b", f"trace={logs['olmoe-1b-7b']}", "prefetch.accuracy=0.5",
                     f"out={tmp_path / 'p'}", "report=false")
    assert rc == 0, err
    said = json.loads((tmp_path / "p" / "summary.json").read_text())["prefetch_modelled_assumption"]
    assert said == "prefetch.accuracy=0.5: that accuracy at every layer (given)"


def test_a_trace_with_its_own_pregating_has_no_assumption(tmp_path):
    res = simulate(parse_run_config(["engine.max_tokens=4"]))
    assert res.summary["prefetch_modelled"] is False and "prefetch_modelled_assumption" not in res.summary


# ------------------------------------------------------------------------------- adapmoe target_share


def test_solve_T_reaches_the_nearest_share():
    costs = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    for target, share in ((0.0, 0.0), (0.1, 0.125), (0.25, 0.125), (0.3, 0.375), (0.5, 0.5), (1.0, 1.0)):
        T, got = solve_T(costs, target)
        assert got == share and float((costs < T).mean()) == share, target
    assert solve_T(np.array([]), 0.5) == (0.0, 0.0)


def test_target_share_on_any_sensitivity_scale():
    tr = random_trace(np.random.default_rng(3), tokens=200, layers=6, experts=8, top_k=2, pregate_depth=0)
    ids = tr.experts.astype(np.int64)
    for scale in (1e-6, 1.0, 1e6):
        S = tr.sensitivity * scale
        T, share = solve_T(single_costs(tr.weights, S), 0.3)
        plan = drop_plan(ids, tr.weights, S, T)
        assert float(((plan.ids >= 0).sum(-1) == 1).mean()) == share and abs(share - 0.3) < 0.01


def _toy(*extra):
    return parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "engine.prefill=false", "gating.name=adapmoe",
                             *extra])


def test_adapmoe_default_aims_at_a_share(tmp_path):
    res = simulate(_toy())  # neither T nor target_share: DEFAULT_TARGET_SHARE on the trace's own S_l
    assert abs(res.summary["single_expert_share"] - DEFAULT_TARGET_SHARE) < 0.01
    T = res.summary["gating_T_solved"]
    again = simulate(_toy(f"gating.T={T!r}")).summary  # the solved T, given: the same run
    assert again["single_expert_share"] == res.summary["single_expert_share"] and "gating_T_solved" not in again
    ours = simulate(_toy("gating.target_share=0.6")).summary
    assert abs(ours["single_expert_share"] - 0.6) < 0.01


@pytest.mark.parametrize("extra, message", [
    (["gating.T=0.005", "gating.target_share=0.3"], "give gating.T or gating.target_share, not both"),
    (["gating.target_share=1.5"], "'gating.target_share': 1.5 (must be a number >= 0 and <= 1)"),
    (["gating.min_experts=2"], "which gating.min_experts=2 forbids: give gating.T"),
])
def test_adapmoe_knobs_refused(tmp_path, capsys, extra, message):
    rc, _, err = run(capsys, "run", "hw=rtx4090.yaml", "gating.name=adapmoe", *extra, f"out={tmp_path / 'o'}")
    assert rc == 2 and message in err, err


def test_the_adapmoe_preset_with_target_share(tmp_path):
    """The preset sets no T: its default share (0.25) is solved on the trace, on any sensitivity
    scale; `gating.target_share=X` aims it elsewhere."""
    from policies.presets import PRESETS

    assert "T" not in PRESETS["adapmoe"]["gating"] and "target_share" not in PRESETS["adapmoe"]["gating"]
    base = ["hw=rtx4090.yaml", "policy=adapmoe", "cache.slots=64", "engine.prefill=false"]
    s = simulate(parse_run_config(base)).summary
    assert abs(s["single_expert_share"] - 0.25) < 0.01 and s["gating_T_solved"] > 0
    s = simulate(parse_run_config([*base, "gating.target_share=0.3"])).summary
    assert abs(s["single_expert_share"] - 0.3) < 0.01
