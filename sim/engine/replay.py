"""The order in which a trace is replayed, shared by the simulator and the real-run engine.

For each sequence (request) in trace order: its prompt as one prefill batch (when the trace has
prefill tokens and `prefill` is on), then its decode tokens one by one, stopping after
`max_tokens` decode tokens (0: all). Compute operations are recorded for the first
`timeline_tokens` decode tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from sim.trace.format import Trace


def replay_steps(trace: Trace, prefill: bool, max_tokens: int, timeline_tokens: int) -> Iterator[tuple]:
    """Yields ("prefill", [token indices]) and ("decode", token index, record_ops)."""
    seqs, is_decode = trace.seq.tolist(), trace.is_decode.tolist()
    decoded, i, T = 0, 0, trace.num_tokens
    while i < T:
        j = i
        while j < T and seqs[j] == seqs[i]:
            j += 1
        prompt = [t for t in range(i, j) if not is_decode[t]]
        if prompt and prefill:
            yield ("prefill", prompt)
        for t in range(i, j):
            if not is_decode[t]:
                continue
            if max_tokens and decoded >= max_tokens:
                return
            yield ("decode", t, decoded < timeline_tokens)
            decoded += 1
        i = j
