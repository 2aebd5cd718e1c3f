"""Continuous batching, as vLLM schedules it: which requests run in the next step, and with how
many tokens each (`batch.*`, `spec.*`).

A request's states: WAITING (arrived, not admitted; or preempted) -> PREFILL (admitted: its
prompt is computed in chunks of at most `batch.prefill_chunk` tokens) -> DECODE (one token per
step, or a verify of `spec.k + 1` positions) -> DONE. Its first output token comes when its prompt
is computed (or, without prompt routing in the trace, with its first decode step); each decode
step emits one token (a verify: the accepted drafts and one more).

Each step (`plan`): under `batch.max_requests` running requests and `batch.max_tokens` tokens,
`batch.priority=decode` (default) first gives every decoding request its tokens, then continues
the prefills of admitted requests, then admits waiting requests first come, first served while
their first chunk's KV fits; `priority=prefill` does the prefills and admissions first. A
running request whose KV cannot grow (a decode, or its next prompt chunk) preempts the most
recently admitted running request (its KV freed; it waits at the head of the queue and
recomputes its prompt and the tokens it had produced as a prefill when re-admitted: vLLM's
recompute preemption), itself if it is the last; a step that preempts admits no one. A request's
attention context is the positions whose KV it holds.

Speculative decoding (`spec.k` > 0): a decoding request verifies the next k + 1 positions of
its routing at once (fewer at its end); `spec.acceptance` is the chance each draft token is
accepted, drawn in order with the run's seeded generator (the first rejected ends the run of
accepted ones); the step emits accepted + 1 tokens. A step with a verify first runs the draft
model: `k x spec.draft_s` on the compute stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from sim.errors import UserError
from sim.serving.kv import KvBudget


@dataclass
class BatchOptions:
    max_requests: int = 16  # running requests at most (vLLM max_num_seqs)
    max_tokens: int = 2048  # tokens per step at most, decode and prefill (vLLM max_num_batched_tokens)
    prefill_chunk: int = 0  # prompt tokens of one request per step at most (0: up to max_tokens; chunked prefill)
    priority: str = "decode"  # decode: decodes first, then prefills (vLLM v1); prefill: prefills and admissions first


@dataclass
class SpecOptions:
    k: int = 0  # draft tokens verified per step (0: no speculative decoding)
    acceptance: float = 0.7  # chance that each draft token is accepted
    draft_s: float = 0.0  # draft-model time per draft token (s), on the compute stream


def check_options(batch: BatchOptions, spec: SpecOptions) -> None:
    if batch.max_requests < 1:
        raise UserError(f"batch.max_requests must be >= 1, got {batch.max_requests}")
    if batch.max_tokens < 1:
        raise UserError(f"batch.max_tokens must be >= 1, got {batch.max_tokens}")
    if batch.prefill_chunk < 0:
        raise UserError(f"batch.prefill_chunk must be >= 0, got {batch.prefill_chunk}")
    if batch.priority not in ("decode", "prefill"):
        raise UserError(f"batch.priority must be decode or prefill, got {batch.priority!r}")
    if spec.k < 0:
        raise UserError(f"spec.k must be >= 0, got {spec.k}")
    if not 0.0 <= spec.acceptance <= 1.0:
        raise UserError(f"spec.acceptance must be in [0, 1], got {spec.acceptance}")
    if spec.draft_s < 0:
        raise UserError(f"spec.draft_s must be >= 0, got {spec.draft_s}")
    if spec.k and spec.k + 1 > batch.max_tokens:
        raise UserError(f"spec.k={spec.k} needs {spec.k + 1} tokens per verify; batch.max_tokens is {batch.max_tokens}")


WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass(eq=False)
class Live:
    """A request as the scheduler tracks it."""

    req: object  # sim.serving.workload.Request
    arrival_s: float
    state: str = WAITING
    prefill_rows: list[int] = field(default_factory=list)  # rows to compute before decoding
    prefilled: int = 0  # of prefill_rows, computed
    decoded: int = 0  # decode rows computed (and kept)
    kv_tokens: int = 0  # positions whose KV it holds
    admitted_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    preemptions: int = 0
    recompute: bool = False  # its prefill recomputes what a preemption dropped (emits no token)

    def __post_init__(self) -> None:
        self.prefill_rows = list(self.req.prompt_rows)


@dataclass
class Work:
    """One request's share of a step: `rows` of the trace computed at `context` positions before
    them; `kind` prefill, decode or verify."""

    live: Live
    kind: str
    rows: list[int]
    context: int


class Scheduler:
    def __init__(self, batch: BatchOptions, spec: SpecOptions, kv: KvBudget, rng: np.random.Generator):
        self.opt, self.spec, self.kv = batch, spec, kv
        self.rng = rng
        self.waiting: deque[Live] = deque()
        self.running: list[Live] = []
        self.preemptions = 0
        self._preempted_now = False

    def arrive(self, live: Live) -> None:
        self.waiting.append(live)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ a step
    def plan(self, now_s: float) -> list[Work]:
        """The next step's work (empty: nothing can run now)."""
        budget = [self.opt.max_tokens]
        out: list[Work] = []
        self._preempted_now = False  # a step that preempts admits no one (vLLM v1)
        if self.opt.priority == "decode":
            self._decodes(out, budget)
            self._prefills(out, budget, now_s)
        else:
            self._prefills(out, budget, now_s)
            self._decodes(out, budget)
        return out

    def _decodes(self, out: list[Work], budget: list[int]) -> None:
        for live in list(self.running):
            if (live.state == DECODE and live in self.running  # (a preemption may have taken it)
                    and not any(w.live is live for w in out)):  # (admitted and decoded this step already)
                self._decode(live, out, budget)

    def _decode(self, live: Live, out: list[Work], budget: list[int]) -> None:
        """`live`'s decode (or verify) positions for this step, preempting for their KV if need be."""
        n = self._decode_size(live)
        if n > budget[0]:
            return
        while not self.kv.fits(n) and live in self.running:
            self._preempt(self.running[-1], out, budget)
        if live not in self.running:
            return
        context = live.kv_tokens
        self.kv.take(n)
        live.kv_tokens += n
        rows = live.req.decode_rows[live.decoded:live.decoded + n]
        out.append(Work(live, "verify" if self.spec.k else "decode", rows, context))
        budget[0] -= n

    def _decode_size(self, live: Live) -> int:
        """Positions a decode step of `live` computes: 1, or a verify's k + 1 (fewer at its end)."""
        k = self.spec.k
        return min(k + 1, len(live.req.decode_rows) - live.decoded) if k else 1

    def _prefills(self, out: list[Work], budget: list[int], now_s: float) -> None:
        for live in list(self.running):
            if live.state == PREFILL and budget[0] > 0 and live in self.running:
                self._chunk(live, out, budget, preempt=True)
        while (self.waiting and len(self.running) < self.opt.max_requests and budget[0] > 0
               and not self._preempted_now):
            live = self.waiting[0]
            n = self._chunk_size(live, budget[0]) if live.prefill_rows else self._decode_size(live)
            if not self.kv.fits(max(n, 1)) or n > budget[0]:
                break  # first come, first served: nothing behind it is admitted either
            self.waiting.popleft()
            self.running.append(live)
            if live.admitted_s is None:
                live.admitted_s = now_s
            if live.prefill_rows:
                live.state = PREFILL
                self._chunk(live, out, budget)
            else:  # no prompt routing (or nothing to recompute): it decodes in this step
                live.state = DECODE
                live.recompute = False
                self._decode(live, out, budget)

    def _chunk_size(self, live: Live, budget: int) -> int:
        n = len(live.prefill_rows) - live.prefilled
        if self.opt.prefill_chunk:
            n = min(n, self.opt.prefill_chunk)
        return min(n, budget)

    def _chunk(self, live: Live, out: list[Work], budget: list[int], preempt: bool = False) -> None:
        """`live`'s next prompt chunk; a running request's (`preempt`) preempts for its KV as a
        decode does (a newly admitted one was admitted because its chunk fits)."""
        n = self._chunk_size(live, budget[0])
        if n <= 0:
            return
        while preempt and not self.kv.fits(n) and live in self.running:
            self._preempt(self.running[-1], out, budget)
        if live not in self.running or not self.kv.fits(n):
            return
        context = live.kv_tokens
        self.kv.take(n)
        rows = live.prefill_rows[live.prefilled:live.prefilled + n]
        out.append(Work(live, "prefill", rows, context))
        live.kv_tokens += n
        budget[0] -= n

    def _preempt(self, victim: Live, out: list[Work], budget: list[int]) -> None:
        """vLLM's recompute preemption: free its KV; it waits at the head of the queue and, once
        re-admitted, recomputes its prompt and the decode positions it had computed. Work already
        planned for it in this step is taken back."""
        mine = [w for w in out if w.live is victim]
        if mine:
            out[:] = [w for w in out if w.live is not victim]
            budget[0] += sum(len(w.rows) for w in mine)
        self.running.remove(victim)
        self.kv.give(victim.kv_tokens)
        victim.kv_tokens = 0
        victim.prefill_rows = list(victim.req.prompt_rows) + list(victim.req.decode_rows[:victim.decoded])
        victim.prefilled = 0
        victim.recompute = bool(victim.token_times_s)  # preempted in its first prefill: its first token is still to come
        victim.state = WAITING
        victim.preemptions += 1
        self.preemptions += 1
        self._preempted_now = True
        self.waiting.appendleft(victim)

    # ------------------------------------------------------------------ after the step
    def accepted(self, n_rows: int) -> int:
        """Positions a verify of `n_rows` keeps: the accepted drafts (a seeded run) and one more."""
        a = 0
        while a < n_rows - 1 and self.rng.random() < self.spec.acceptance:
            a += 1
        return a + 1

    def complete(self, work: list[Work], end_s: float) -> list[Live]:
        """The step ended at `end_s`: tokens emitted, states moved. Returns the requests that finished."""
        finished = []
        for w in work:
            live = w.live
            if w.kind == "prefill":
                live.prefilled += len(w.rows)
                if live.prefilled == len(live.prefill_rows):
                    if not live.recompute:
                        live.token_times_s.append(end_s)  # the prompt's last position gives the first token
                    live.recompute = False
                    live.state = DECODE
            else:
                keep = self.accepted(len(w.rows)) if w.kind == "verify" else 1
                drop = len(w.rows) - keep  # rejected positions: their KV is dropped
                if drop:
                    self.kv.give(drop)
                    live.kv_tokens -= drop
                live.decoded += keep
                live.token_times_s.extend([end_s] * keep)
            if live.state == DECODE and live.decoded >= len(live.req.decode_rows):
                live.state = DONE
                self.running.remove(live)
                self.kv.give(live.kv_tokens)
                live.kv_tokens = 0
                finished.append(live)
        return finished
