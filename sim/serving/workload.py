"""Serving workloads: which requests arrive, when, and which trace rows each one replays.

A workload is the config section `workload.*` (`WorkloadOptions`). Its kind is one of

    replay   today's batch-1 replay of the whole trace, one sequence after another: no serving,
             no requests (`make_requests` is not called for it)
    open     requests arrive on their own, whatever the server does: Poisson arrivals at `rate`
             requests per second, or the times of an `arrivals=` file (CSV or Parquet)
    closed   `users` users, each sending its next request `think_s` seconds after its last one
             finished; the first `users` requests are sent at time 0

Each request replays one sequence of the trace (`sequences(trace)`: its prompt rows, then its
decode rows, both in row order). `order=random` draws the sequences with the run's seed (a
permutation while `requests` <= the sequences, else with replacement); `order=trace` cycles
through them in trace order. A request keeps the FIRST `max_prompt` prompt rows and the FIRST
`max_output` decode rows of its sequence (0: no cap); an arrivals file's `prompt_tokens` and
`output_tokens` cap each request further. A request asking for more tokens than its sequence has
gets what the sequence has (the trace holds no more routing to replay). A sequence without decode
rows (a prompt-only one) cannot be a request and is never drawn. A trace without prompt rows gives
requests with empty `prompt_rows`.

The state of a request (`Request`), set here:

    rid          0..n-1, in arrival order (open) or submission order (closed)
    seq          the trace sequence it replays
    prompt_rows  trace row indices of its prompt, capped, in order (may be empty)
    decode_rows  trace row indices of its decode tokens, capped, in order (never empty)
    arrival_s    open: its arrival time (s, > 0 for Poisson arrivals); closed: None, set by the
                 simulator when the request's user sends it
    user         closed: a default label rid % users; the simulator reassigns it to whichever user
                 frees first; open: -1

Random draws, always in this order so that the same options, trace and seed give the same
requests: the sequences (order=random), then the inter-arrival gaps (open with `rate`).

Errors, each a `UserError` of one line (`check`, then `make_requests`):

    workload.kind not replay, open or closed
    workload.rate <= 0 or not finite (open, without arrivals=)
    workload.users < 1 (closed)
    workload.think_s < 0 or not finite
    workload.requests, workload.max_prompt or workload.max_output < 0
    workload.order not random or trace
    workload.arrivals= given with a kind other than open
    the trace has no sequence with decode rows (after capping)
    arrivals file: not .csv or .parquet; missing, a folder, unreadable, or holding no rows;
        no column arrival_s (the message lists the columns found); a null, NaN, infinite,
        negative or non-numeric arrival_s (names the first bad row, 1-based, not counting a CSV
        header, and its value); a prompt_tokens that is not an integer >= 0, or an output_tokens
        that is not an integer >= 1 (names the row); fewer rows than workload.requests
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sim.errors import UserError

KINDS = ("replay", "open", "closed")
ORDERS = ("random", "trace")
ARRIVAL_SUFFIXES = (".csv", ".parquet")


@dataclass
class WorkloadOptions:
    kind: str = "replay"  # replay (batch-1 replay of the trace, no serving), open (requests arrive on their own), closed (users wait for answers)
    rate: float = 1.0  # open: Poisson arrivals, requests per second
    arrivals: str = ""  # open: CSV or Parquet file with column arrival_s (s, >= 0), optional prompt_tokens, output_tokens; replaces rate
    users: int = 1  # closed: concurrent users, each sends its next request think_s after its last one finished
    think_s: float = 0.0  # closed: seconds a user waits between an answer and its next request
    requests: int = 0  # number of requests (0: one per usable sequence of the trace; with arrivals=, the file's rows)
    order: str = "random"  # which sequence each request replays: random (seeded; a permutation while requests <= sequences, else with replacement) or trace (trace order, cycling)
    max_prompt: int = 0  # keep at most the first N prompt tokens of a request (0: all)
    max_output: int = 0  # keep at most the first N decode tokens of a request (0: all)


@dataclass
class Request:
    rid: int  # 0..n-1 in arrival (open) or submission (closed) order
    seq: int  # the trace sequence it replays
    prompt_rows: list[int]  # trace row indices of its prompt (capped), in order; may be empty
    decode_rows: list[int]  # trace row indices of its decode tokens (capped), in order; never empty
    arrival_s: float | None  # open: its arrival time; closed: None (set when its user sends it)
    user: int = -1  # closed: the user (0..users-1) that sends it (default rid % users, reassigned by the simulator); open: -1


def check(opts: WorkloadOptions) -> None:
    """Refuse a bad `workload.*` value with a one-line UserError naming the field and the value."""
    if opts.kind not in KINDS:
        raise UserError(f"workload.kind must be one of {', '.join(KINDS)}, got {opts.kind!r}")
    if opts.order not in ORDERS:
        raise UserError(f"workload.order must be one of {', '.join(ORDERS)}, got {opts.order!r}")
    if opts.arrivals and opts.kind != "open":
        raise UserError(f"workload.arrivals={opts.arrivals} needs workload.kind=open, got {opts.kind!r}")
    if opts.kind == "open" and not opts.arrivals and not (opts.rate > 0 and math.isfinite(opts.rate)):
        raise UserError(f"workload.rate must be a finite number > 0 (requests per second), got {opts.rate!r}")
    if opts.kind == "closed" and opts.users < 1:
        raise UserError(f"workload.users must be >= 1, got {opts.users!r}")
    if not (opts.think_s >= 0 and math.isfinite(opts.think_s)):
        raise UserError(f"workload.think_s must be a finite number >= 0, got {opts.think_s!r}")
    for name in ("requests", "max_prompt", "max_output"):
        if getattr(opts, name) < 0:
            raise UserError(f"workload.{name} must be >= 0, got {getattr(opts, name)!r}")


def sequences(trace: Any) -> list[tuple[int, list[int], list[int]]]:
    """(seq id, prompt rows, decode rows) of each sequence, in order of first appearance in the
    trace; rows are trace row indices in increasing order."""
    seq = np.asarray(trace.seq)
    is_decode = np.asarray(trace.is_decode, dtype=bool)
    if seq.size == 0:
        return []
    by_seq = np.argsort(seq, kind="stable")  # rows grouped by seq id, each group in row order
    cuts = np.flatnonzero(np.diff(seq[by_seq])) + 1
    groups = sorted(np.split(by_seq, cuts), key=lambda rows: int(rows[0]))
    return [(int(seq[rows[0]]), rows[~is_decode[rows]].tolist(), rows[is_decode[rows]].tolist())
            for rows in groups]


def make_requests(opts: WorkloadOptions, trace: Any, rng: np.random.Generator) -> list[Request]:
    """The requests of an open or closed workload over `trace` (see the module docstring); the
    same options, trace and seed give the same list."""
    check(opts)
    if opts.kind == "replay":
        raise ValueError("make_requests: workload.kind=replay has no requests (the trace is replayed as it is)")
    usable = [(s, _cap(p, opts.max_prompt), _cap(d, opts.max_output)) for s, p, d in sequences(trace) if d]
    if not usable:
        raise UserError("the trace has no sequence with decode tokens: a request needs at least one to replay")

    file_rows: tuple[list[float], list[int | None], list[int | None]] | None = None
    if opts.arrivals:
        file_rows = _read_arrivals(opts.arrivals, opts.requests)
        n = len(file_rows[0])
    else:
        n = opts.requests or len(usable)

    if opts.order == "trace":
        picks = [i % len(usable) for i in range(n)]
    elif n <= len(usable):
        picks = rng.permutation(len(usable))[:n].tolist()
    else:
        picks = rng.choice(len(usable), size=n, replace=True).tolist()

    if file_rows is not None:
        arrivals_s, prompt_caps, output_caps = file_rows
    elif opts.kind == "open":
        arrivals_s = np.cumsum(rng.exponential(1.0 / opts.rate, n)).tolist()
        prompt_caps = output_caps = [None] * n
    else:
        arrivals_s, prompt_caps, output_caps = [None] * n, [None] * n, [None] * n

    requests = []
    for rid, pick in enumerate(picks):
        seq, prompt, decode = usable[pick]
        requests.append(Request(
            rid=rid, seq=seq,
            prompt_rows=prompt[:prompt_caps[rid]] if prompt_caps[rid] is not None else list(prompt),
            decode_rows=decode[:output_caps[rid]] if output_caps[rid] is not None else list(decode),
            arrival_s=arrivals_s[rid],
            user=rid % opts.users if opts.kind == "closed" else -1,
        ))
    return requests


def _cap(rows: list[int], cap: int) -> list[int]:
    """The first `cap` rows (0: all)."""
    return rows[:cap] if cap > 0 else rows


def _read_arrivals(path: str, requests: int) -> tuple[list[float], list[int | None], list[int | None]]:
    """An arrivals file's (arrival_s, prompt_tokens, output_tokens) per row, sorted by arrival_s
    (stable), the first `requests` of them when > 0; a None cap: the column is absent."""
    frame = _read_frame(Path(path))
    if "arrival_s" not in frame.columns:
        found = ", ".join(frame.columns) or "none"
        raise UserError(f"arrivals file {path}: no column arrival_s (columns found: {found})")
    if frame.height == 0:
        raise UserError(f"arrivals file {path} holds no rows")
    arrival_s = _numbers(frame, "arrival_s", path)
    for i, v in enumerate(arrival_s):
        if v is None or not (math.isfinite(v) and v >= 0):
            raise UserError(f"arrivals file {path}: row {i + 1}: arrival_s must be a finite number >= 0, "
                            f"got {_shown(frame['arrival_s'][i])}")
    caps = {}
    for col, least in (("prompt_tokens", 0), ("output_tokens", 1)):
        if col not in frame.columns:
            caps[col] = [None] * frame.height
            continue
        values = _numbers(frame, col, path)
        for i, v in enumerate(values):
            if v is None or not (math.isfinite(v) and v == int(v) and v >= least):
                raise UserError(f"arrivals file {path}: row {i + 1}: {col} must be an integer >= {least}, "
                                f"got {_shown(frame[col][i])}")
        caps[col] = [int(v) for v in values]
    order = sorted(range(frame.height), key=lambda i: arrival_s[i])  # Python's sort is stable
    if requests > 0:
        if frame.height < requests:
            raise UserError(f"arrivals file {path} has {frame.height} rows, fewer than workload.requests={requests}")
        order = order[:requests]
    return ([float(arrival_s[i]) for i in order],
            [caps["prompt_tokens"][i] for i in order],
            [caps["output_tokens"][i] for i in order])


def _read_frame(p: Path) -> pl.DataFrame:
    if p.suffix.lower() not in ARRIVAL_SUFFIXES:
        raise UserError(f"arrivals file {p}: must end in .csv or .parquet, got {p.suffix or 'no suffix'!r}")
    if p.is_dir():
        raise UserError(f"arrivals file {p} is a folder, not a file")
    if not p.is_file():
        raise UserError(f"arrivals file not found: {p}")
    try:
        return pl.read_csv(p) if p.suffix.lower() == ".csv" else pl.read_parquet(p)
    # polars raises several types for a bad file; a Rust panic is a BaseException
    except (Exception, pl.exceptions.PanicException) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise UserError(f"arrivals file {p} cannot be read: {lines[0][:160]}") from None


def _numbers(frame: pl.DataFrame, col: str, path: str) -> list[float | None]:
    """A column as floats; a null, or a value that is not a number, is None."""
    column = frame[col]
    if not (column.dtype.is_numeric() or column.dtype in (pl.Null, pl.Utf8)):
        raise UserError(f"arrivals file {path}: column {col} must hold numbers, holds {column.dtype}")
    return column.cast(pl.Float64, strict=False).to_list()


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)
