"""Serving workloads end to end (docs/serving.md): the replay reproduced by one closed-loop user,
the union of experts a batched step runs checked against numpy, preemption, shared KV memory,
speculative verification, the two machines, and the bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from sim.cli import main
from sim.config import parse_run_config
from sim.runner import build_engine, load_trace, simulate
from sim.serving.run import build_serving
from tests.engine_helpers import import_humaneval

ONE_USER = ["workload.kind=closed", "workload.users=1", "workload.order=trace"]


@pytest.mark.parametrize("hw", ["jetson.yaml", "rtx4090.yaml"])
@pytest.mark.parametrize("policy", ["baseline", "lfu", "mixtral_offloading", "adapmoe", "adapmoe_yield", "fiddler",
                                    "hobbit"])
def test_one_closed_user_reproduces_the_replay(policy, hw):
    if policy == "fiddler" and hw == "jetson.yaml":
        pytest.skip("CPU placement does not apply where experts live on storage")
    base = [f"hw={hw}", f"policy={policy}", "cache.slots=64", "report=false"]
    replay = simulate(parse_run_config(base))
    served = simulate(parse_run_config(base + ONE_USER))
    for col in ("start_s", "end_s", "stall_s", "demand_loads", "hits"):
        assert served.tokens[col].to_list() == replay.tokens[col].to_list(), col
    req = served.requests.sort("rid")
    # each request's first token at its prefill's end, as the replay's TTFT
    assert req["first_token_s"].to_list() == replay.tokens.group_by("seq", maintain_order=True).agg(
        pl.col("start_s").first())["start_s"].to_list()
    assert req.height == 16 and req["output_tokens"].to_list() == [129] * 16
    assert served.summary["preemptions"] == 0


def _lockstep_union(trace, seqs: list[int], prompt: bool) -> float:
    """The mean over steps and layers of the distinct experts of the batch's tokens, computed
    from the trace: one step with every prompt, then step i with decode token i of every request
    still running (the schedule of B requests admitted together)."""
    from sim.serving.workload import sequences

    by_seq = {s: (p, d) for s, p, d in sequences(trace)}
    experts = trace.experts.astype(np.int64)  # [T, L, k]
    L = experts.shape[1]
    unions = []
    if prompt:
        rows = [r for s in seqs for r in by_seq[s][0]]
        unions.append(np.mean([np.unique(experts[rows, layer]).size for layer in range(L)]))
    longest = max(len(by_seq[s][1]) for s in seqs)
    for i in range(longest):
        rows = [by_seq[s][1][i] for s in seqs if i < len(by_seq[s][1])]
        unions.append(np.mean([np.unique(experts[rows, layer]).size for layer in range(L)]))
    return float(np.mean(unions))


def _union_case(trace_path: str, B: int, prompt: bool):
    trace = load_trace(trace_path)
    cfg = parse_run_config([f"trace={trace_path}", "hw=rtx4090.yaml", "cache.slots=64", "report=false",
                            "workload.kind=closed", f"workload.users={B}", f"workload.requests={B}",
                            "workload.order=trace", "gating.name=topk", "prefetch.name=none"])
    res = simulate(cfg)
    seqs = res.requests.sort("rid")["seq"].to_list()
    return res.summary["union_experts_per_layer_mean"], _lockstep_union(trace, seqs, prompt)


@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_union_of_experts_equals_numpy_bundled(B):
    got, want = _union_case("traces/toy", B, prompt=True)
    assert got == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def he_trace(tmp_path_factory):
    return import_humaneval(tmp_path_factory.mktemp("he") / "he")


@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_union_of_experts_equals_numpy_humaneval(he_trace, B):
    got, want = _union_case(he_trace, B, prompt=False)
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("gating", [["gating.name=topk"], ["gating.name=adapmoe", "gating.sensitivity=trace"]])
def test_a_steps_union_from_the_plan_is_its_rows_gated_one_by_one(gating):
    # `Engine.batch_union` (one numpy pass per step) against `decide` row by row, duplicates included
    trace = load_trace("traces/toy")
    engine, _ = build_engine(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", *gating]), trace)
    rng = np.random.default_rng(3)
    for _ in range(20):
        rows = rng.integers(0, trace.num_tokens, size=int(rng.integers(1, 24))).tolist()
        counts, weight, by_layer = engine.batch_union(rows, weights=True)
        assert set(counts) == set(weight) == {k for keys in by_layer for k in keys}
        for layer, ranked in enumerate(by_layer):
            want_n: dict[int, int] = {}
            want_w: dict[int, float] = {}
            for t in rows:
                keys, ws, _ = engine.decide(t, layer)
                for k, w in zip(keys, ws, strict=True):
                    want_n[k] = want_n.get(k, 0) + 1
                    want_w[k] = max(want_w.get(k, -1.0), w)
            assert {k: counts[k] for k in ranked} == want_n and {k: weight[k] for k in ranked} == want_w
            assert ranked == sorted(want_n, key=lambda k: (-want_n[k], k))
        assert engine.batch_union(rows, weights=False)[1] is None


def test_batching_shares_experts_and_every_request_finishes():
    res = simulate(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "report=false", "workload.kind=open",
                                     "workload.rate=2", "workload.requests=24", "batch.max_requests=8"]))
    s, req = res.summary, res.requests
    assert s["requests"] == 24 and req["finish_s"].null_count() == 0
    assert 1.0 < s["batch_size_mean"] <= 8.0
    assert s["union_experts_per_layer_mean"] < 2 * s["batch_size_mean"]  # shared experts: less than top-2 each
    assert (req["ttft_s"] > 0).all() and (req["e2e_s"] >= req["ttft_s"]).all()
    assert (res.steps["requests"] <= 8).all()


def test_preemption_recomputes_and_keeps_every_token():
    # the Jetson's 8 GB leave ~90 MB of KV: four users of 192-token requests cannot all fit
    res = simulate(parse_run_config(["hw=jetson.yaml", "report=false", "workload.kind=closed", "workload.users=4",
                                     "workload.requests=8"]))
    assert res.summary["preemptions"] > 0
    assert res.requests["output_tokens"].to_list() == [129] * 8
    assert res.summary["kv_bytes_peak"] <= res.summary["kv_budget_bytes"]


def test_shared_kv_shrinks_the_expert_cache():
    common = ["hw=rtx4090.yaml", "cache.slots=64", "report=false", "workload.kind=closed", "workload.users=8",
              "workload.requests=8", "prefetch.name=none"]
    kv_bytes = 8 * 192 * 131072 * 0.5  # half of what eight requests need at their end
    static = simulate(parse_run_config(common + [f"memory.kv_bytes={kv_bytes * 2}"]))
    shared = simulate(parse_run_config(common + [f"memory.kv_bytes={kv_bytes}", "memory.kv=shared"]))
    cap = shared.summary["cache_slots"] * shared.summary["expert_bytes"]
    exp = shared.steps["expert_cache_bytes"]
    assert exp.min() < cap and exp.min() >= 2 * shared.summary["expert_bytes"]
    assert (static.steps["expert_cache_bytes"] == cap).all()
    assert shared.summary["bytes_loaded_per_output_token"] > static.summary["bytes_loaded_per_output_token"]


def test_shrinking_the_cache_evicts_from_the_next_fullest_layer_when_the_fullest_is_loading():
    from sim.engine.cache import ABSENT, LOADING

    engine, _ = build_engine(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "cache.name=lru",
                                               "cache.scope=layer"]), load_trace("traces/toy"))
    cache, pol, eb, E = engine.cache, engine.cache_policy, engine.expert_bytes, engine.E
    for key in (0, 1):  # layer 0: two experts still loading (not evictable)
        cache.begin_load(key, eb)
        pol.on_insert(key, -1)
    cache.insert_resident(E + 3, eb)  # layer 1: one resident expert
    pol.on_insert(E + 3, -1)
    engine.ledger.resize_cache(2 * eb, 0)
    assert cache.state[E + 3] == ABSENT and cache.state[0] == cache.state[1] == LOADING
    assert cache.used_bytes == 2 * eb
    engine.ledger.resize_cache(eb, 0)  # only loading experts left: the cache stays over until they land
    assert cache.used_bytes == 2 * eb


@pytest.mark.parametrize("acceptance,per_step", [(1.0, 4), (0.0, 1)])
def test_speculative_verify_advances_by_the_accepted(acceptance, per_step):
    res = simulate(parse_run_config(ONE_USER + ["hw=rtx4090.yaml", "cache.slots=64", "report=false",
                                                "workload.requests=2", "spec.k=3", f"spec.acceptance={acceptance}",
                                                "spec.draft_s=0.001"]))
    decode_steps = res.steps.filter(pl.col("decode_tokens") > 0)
    # 128 decode tokens per request, verified per_step at a time (the last verify may be shorter)
    assert decode_steps.height == 2 * -(-128 // per_step)
    assert res.requests["output_tokens"].to_list() == [129, 129]
    assert (decode_steps["decode_tokens"] <= 4).all()


@pytest.mark.parametrize("hw,policy", [("jetson.yaml", "mixtral_offloading"), ("rtx4090.yaml", "fiddler"),
                                       ("rtx4090.yaml", "adapmoe")])
def test_same_seed_same_numbers_and_the_event_machine_agrees(hw, policy):
    args = [f"hw={hw}", f"policy={policy}", "cache.slots=64", "report=false", "workload.kind=open",
            "workload.rate=0.5", "workload.requests=6", "batch.max_requests=4", "workload.max_output=12",
            "batch.prefill_chunk=16"]
    a = simulate(parse_run_config(args)).summary
    b = simulate(parse_run_config(args)).summary
    assert a == b
    cfg = parse_run_config(args)
    ends = {}
    for machine in ("fast", "events"):
        engine, info = build_engine(cfg, machine=machine)
        serving = build_serving(cfg, engine, info)
        serving.run()
        ends[machine] = np.array([s.end_s for s in serving.steps])
    assert ends["fast"].shape == ends["events"].shape
    np.testing.assert_allclose(ends["fast"], ends["events"], rtol=1e-9)


@pytest.mark.parametrize("args,match", [
    (["workload.kind=open", "workload.rate=0"], "workload.rate"),
    (["workload.kind=closed", "workload.users=0"], "workload.users"),
    (["workload.kind=open", "batch.max_requests=0"], "batch.max_requests"),
    (["workload.kind=open", "memory.kv_bytes=1000"], "cannot hold one request's context"),
    (["workload.kind=open", "spec.k=200"], "spec.k=200"),
    (["workload.kind=open", "cache.name=belady"], "replay's order"),
    (["workload.kind=open", "oracle=true"], "oracle=true"),
])
def test_bad_serving_inputs(args, match, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["run", "hw=rtx4090.yaml", f"out={out}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_arrivals_file(tmp_path, capsys):
    f = tmp_path / "arrivals.csv"
    f.write_text("arrival_s\n0.5\n-1.0\n")
    out = tmp_path / "res"
    rc = main(["run", "hw=rtx4090.yaml", f"out={out}", "workload.kind=open", f"workload.arrivals={f}"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 2" in err and not out.exists(), err


def test_serving_results_folder(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["run", "hw=rtx4090.yaml", "cache.slots=64", f"out={out}", "workload.kind=open", "workload.rate=1",
               "workload.requests=4", "slo.ttft_s=5", "slo.tpot_s=1"])
    assert rc == 0
    for f in ("summary.json", "config.yaml", "requests.parquet", "steps.parquet", "report.html"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    req = pl.read_parquet(out / "requests.parquet")
    assert s["requests"] == req.height == 4
    good = req.filter((pl.col("ttft_s") <= 5) & (pl.col("tpot_mean_s") <= 1)).height
    makespan = req["finish_s"].max() - req["arrival_s"].min()
    assert s["goodput_requests_per_s"] == pytest.approx(good / makespan)


def test_pregate_union_ranks_the_batch_votes():
    """Hand-computed: 3 tokens predict layer 1's experts [5, 6], [6, 7], [6, 5] (keys of layer 1 =
    8 + expert); with count=2 the votes are 6: 3, 5: 2, 7: 1; expert 5 is resident, so the
    prefetches are 14 then 15 (limit=0), or only 14 (limit=1)."""
    from types import SimpleNamespace

    from policies.prefetch.pregate_union import PregateUnion
    from sim.engine.cache import ABSENT, RESIDENT

    pol = object.__new__(PregateUnion)
    E = 8
    pred = np.zeros((3, 2, 2), dtype=np.int32)
    pred[:, 0] = np.array([[5, 6], [6, 7], [6, 5]]) + E  # made at layer 0 for layer 1
    state = [ABSENT] * (2 * E)
    state[E + 5] = RESIDENT
    pol.pred, pol._layers, pol._by_t = {1: pred}, 2, {}
    pol.ctx = SimpleNamespace(cache=SimpleNamespace(state=state))
    pol.knobs = PregateUnion.Knobs(count=2, limit=0)
    assert pol.on_batch([0, 1, 2], 0) == [E + 6, E + 7]
    pol.knobs = PregateUnion.Knobs(count=2, limit=1)
    assert pol.on_batch([0, 1, 2], 0) == [E + 6]
    pol.knobs = PregateUnion.Knobs(count=1, limit=0)  # first choices only: 5 (resident), 6, 6
    assert pol.on_batch([0, 1, 2], 0) == [E + 6]
    assert pol.on_batch([0, 1, 2], 1) == []  # no layer after the last


def test_the_real_run_refuses_a_replay_cap_on_a_serving_workload():
    from sim.errors import UserError
    from sim.realrun.build import parse_realrun

    with pytest.raises(UserError, match="workload.max_output"):
        parse_realrun(["workload.kind=open", "tokens=8"])
    with pytest.raises(UserError, match="rate"):
        parse_realrun(["workload.kind=open", "workload.rate=0"])
    with pytest.raises(UserError, match="live model"):  # the live model replays text, batch 1
        parse_realrun(["live=true", "workload.kind=closed", "workload.users=2"])


def test_a_batched_step_runs_cpu_placed_experts_on_the_cpu():
    res = simulate(parse_run_config(["hw=rtx4090.yaml", "policy=fiddler", "cache.slots=64", "report=false",
                                     "workload.kind=closed", "workload.users=4", "workload.requests=4",
                                     "workload.max_output=16"]))
    batched = res.steps.filter(pl.col("requests") > 1)
    assert batched.height > 0
    assert res.layers["cpu_experts"].sum() > 0
    # nothing to load but what the CPU does not take: fiddler loads far less than top-k per token
    assert res.summary["bytes_loaded_per_output_token"] < 2 * 32 * res.summary["expert_bytes"]


def test_a_prompt_chunk_that_does_not_fit_preempts_and_every_token_comes():
    """Two 72-token requests in 80 tokens of KV, prompts in chunks of 40: the second one's chunk
    must preempt (it used to leave the scheduler with nothing to plan); the preempted request,
    preempted in its first prefill, still gets its first token when its prefill ends."""
    res = simulate(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "report=false", "workload.kind=closed",
                                     "workload.users=2", "workload.requests=2", "workload.max_output=8",
                                     "batch.prefill_chunk=40", f"memory.kv_bytes={80 * 131072}"]))
    assert res.summary["preemptions"] >= 1
    assert res.requests["output_tokens"].to_list() == [9, 9]
    assert res.summary["kv_bytes_peak"] <= 80 * 131072


def test_prefill_first_never_decodes_a_request_twice_in_a_step(tmp_path):
    f = tmp_path / "arrivals.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,0,5\n0,0,5\n")
    res = simulate(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "report=false", "workload.kind=open",
                                     f"workload.arrivals={f}", "batch.priority=prefill"]))
    assert res.requests["output_tokens"].to_list() == [5, 5]
    assert (res.steps["decode_tokens"] <= res.steps["requests"]).all()
    assert res.steps.height == 5


def test_pregates_batch_loop_equals_each_rows_on_layer_deduplicated():
    """`Pregate.on_batch` writes `on_layer`'s loop out; it names what the base class's default
    (each row's `on_layer`, each key once, first named first) names, on random cache states."""
    from policies.base import PrefetchPolicy
    from sim.engine.cache import ABSENT, RESIDENT

    trace = load_trace("traces/toy")
    engine, _ = build_engine(parse_run_config(["hw=rtx4090.yaml", "cache.slots=64", "prefetch.name=pregate",
                                               "prefetch.depth=2", "prefetch.count=2"]), trace)
    pol, state = engine.prefetch, engine.cache.state
    rng = np.random.default_rng(5)
    for _ in range(50):
        state[:] = [RESIDENT if r < 0.4 else ABSENT for r in rng.random(len(state))]
        rows = rng.integers(0, trace.num_tokens, size=int(rng.integers(2, 12))).tolist()
        layer = int(rng.integers(0, engine.L))
        assert pol.on_batch(rows, layer) == PrefetchPolicy.on_batch(pol, rows, layer)
