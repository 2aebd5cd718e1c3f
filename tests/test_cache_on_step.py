"""`CachePolicy.on_step`: the engine tells a cache policy that sets `observes_steps` the rows of every
step at every layer, once, on both machines, in the replay and in a chunked serving run; one that
does not set it is never called; and `mrs` (which folds routing scores at `on_step`) never reads a
row before its step has run."""

from __future__ import annotations

import numpy as np
import pytest

from policies.cache.lru import LRU
from policies.registry import CACHE
from sim.config import parse_run_config
from sim.engine.replay import replay_steps
from sim.runner import build_engine
from sim.serving.run import build_serving

RECORD, SILENT = "test_record_steps", "test_silent_steps"
REPLAY = ["hw=rtx4090.yaml", "cache.slots=64", "engine.max_tokens=12"]
#: requests arriving apart, prompts prefilled 4 tokens at a time, beside the others' decode tokens
CHUNKED = ["hw=rtx4090.yaml", "cache.slots=64", "workload.kind=open", "workload.rate=4", "workload.requests=6",
           "workload.max_output=16", "batch.prefill_chunk=4"]


class RecordSteps(LRU):
    """LRU that records every `on_step` call."""

    observes_steps = True

    def __init__(self, knobs, ctx):
        super().__init__(knobs, ctx)
        self.calls: list[tuple[list[int], int]] = []

    def on_step(self, rows, layer):
        self.calls.append((list(rows), layer))


class SilentSteps(LRU):
    """LRU that leaves `observes_steps` False: the engine must never call its `on_step`."""

    def on_step(self, rows, layer):
        raise AssertionError(f"on_step({rows}, {layer}) called on a policy that does not observe steps")


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The two policies, registered for this module only (the registries are process-wide)."""
    CACHE.register(RECORD)(RecordSteps)
    CACHE.register(SILENT)(SilentSteps)
    yield
    CACHE._classes.pop(RECORD, None)
    CACHE._classes.pop(SILENT, None)


def run_replay(args, machine):
    cfg = parse_run_config(args)
    engine, _ = build_engine(cfg, machine=machine)
    engine.run()
    steps = [s[1] if s[0] == "prefill" else [s[1]]
             for s in replay_steps(engine.ctx.trace, cfg.engine.prefill, cfg.engine.max_tokens, 0)]
    return engine, steps


def run_serving(args, machine="fast", prepare=None):
    """A serving run, with the rows of each step the scheduler planned (the engine's ground truth);
    `prepare(engine)` is called on the built engine before the run."""
    cfg = parse_run_config(args)
    engine, info = build_engine(cfg, machine=machine)
    if prepare is not None:
        prepare(engine)
    serving = build_serving(cfg, engine, info)
    planned: list[list[int]] = []
    step = serving._step

    def recorded(work):
        planned.append([t for w in work for t in w.rows])
        return (yield from step(work))

    serving._step = recorded
    serving.run()
    return engine, planned


def expected(steps, layers):
    return [(rows, layer) for rows in steps for layer in range(layers)]


@pytest.mark.parametrize("machine", ["fast", "events"])
@pytest.mark.parametrize("policy", ["baseline", "adapmoe_yield"])
def test_replay_tells_each_step_once_per_layer(machine, policy):
    engine, steps = run_replay([*REPLAY, f"policy={policy}", f"cache.name={RECORD}"], machine)
    assert steps[0] == list(range(len(steps[0]))) and len(steps[0]) > 1  # a prompt's prefill batch first
    assert engine.cache_policy.calls == expected(steps, engine.L)


@pytest.mark.parametrize("machine", ["fast", "events"])
def test_chunked_serving_tells_each_step_once_per_layer(machine):
    engine, planned = run_serving([*CHUNKED, f"cache.name={RECORD}"], machine)
    assert engine.cache_policy.calls == expected(planned, engine.L)
    trace = engine.ctx.trace
    mixed = [rows for rows in planned if len(rows) > 1 and len({bool(trace.is_decode[t]) for t in rows}) == 2]
    assert mixed, "the run should batch prompt chunks with decode rows"
    for rows in planned:  # a prompt goes in chunks of at most 4 rows
        seqs = [int(trace.seq[t]) for t in rows if not trace.is_decode[t]]
        assert all(seqs.count(s) <= 4 for s in set(seqs))
    told = [t for rows in planned for t in rows]
    assert len(told) == len(set(told))  # (no preemption here: each row runs once)


def test_a_policy_that_does_not_observe_steps_is_never_told():
    for machine in ("fast", "events"):
        engine, _ = run_replay([*REPLAY, f"cache.name={SILENT}"], machine)
        assert engine.rec.tokens["end_s"]
    engine, planned = run_serving([*CHUNKED, f"cache.name={SILENT}"])
    assert planned


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mrs_in_chunked_serving_never_folds_a_row_before_its_step(scope):
    told: list[set[int]] = []
    folded: list[tuple[int, int]] = []
    box = {}

    def prepare(engine):  # every fold of the policy checked against the rows told so far
        mrs = engine.cache_policy
        L = engine.L
        told.extend(set() for _ in range(L))

        def check(layer):  # every (row, layer) folded so far was told, and every told one is folded
            assert mrs.applied[layer].count(1) == len(told[layer])

        def on_step(rows, layer):
            check(layer)
            told[layer].update(rows)
            type(mrs).on_step(mrs, rows, layer)
            check(layer)

        def fold_row(r, layer):
            assert r in told[layer], f"row {r} folded at layer {layer} before its step"
            folded.append((r, layer))
            type(mrs)._fold_row(mrs, r, layer)

        def fold_rows(rows, layer):
            assert set(rows) <= told[layer], f"rows {sorted(set(rows) - told[layer])} folded before their step"
            folded.extend((r, layer) for r in rows)
            type(mrs)._fold_rows(mrs, rows, layer)

        def on_access(key, t):
            check(key // engine.E)
            type(mrs).on_access(mrs, key, t)

        mrs.on_step, mrs._fold_row, mrs._fold_rows, mrs.on_access = on_step, fold_row, fold_rows, on_access
        engine.ledger.cache_policy = mrs  # (the same object: the ledger asks it for victims)
        box["mrs"] = mrs

    engine, planned = run_serving([*CHUNKED, "cache.name=mrs", f"cache.scope={scope}"], prepare=prepare)
    mrs, L = box["mrs"], engine.L
    ran = sorted({t for rows in planned for t in rows})
    assert all(told[layer] == set(ran) for layer in range(L))  # every row of every step, decode rows included
    assert sorted(folded) == sorted((r, layer) for r in ran for layer in range(L))  # each once
    for layer in range(L):
        assert np.flatnonzero(np.frombuffer(bytes(mrs.applied[layer]), np.uint8)).tolist() == ran
    several = [rows for rows in planned if sum(bool(engine.ctx.trace.is_decode[t]) for t in rows) > 1]
    assert several, "the run should batch several decode rows in a step"
