"""The replay as a sequence of steps with the expert keys each one needs (for offline algorithms).

A *step* is what the engine does at one MoE layer: for a decode token, one (token, layer); for a
prompt's prefill, one batch per layer over the prompt (its experts are the union over the
prompt's tokens). Steps are numbered in replay order (`sim.engine.replay.replay_steps`: each sequence's
prefill, then its decode tokens; `max_tokens` respected), so step `s` happens before step `s + 1`.
A key is `layer * experts + expert`.

The experts a step needs come from the gating plan (`ids` [T, L, k], -1 = not run): the gating
policy's decisions when it is stateless, or a subset every outcome includes (the lower bound's
"must run" set) when it is not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from sim.engine.replay import replay_steps
from sim.trace.format import Trace

NEVER = 1 << 62  # the next use of a key that is not used again


@dataclass
class Steps:
    """Steps in replay order. `keys[s]`: the keys step s needs (rank order for decode; for prefill
    by decreasing token count, then key); `count[s]`: tokens per key (1 for decode)."""

    layers: int
    experts: int
    keys: list[list[int]]
    count: list[list[int]]
    is_prefill: list[bool]
    token: list[int]  # the decode token, or a prompt's first token
    layer: list[int]
    sequence: list[int]
    #: decode token t -> step of its layer 0 (then + layer); prompt's first token -> its prefill's
    first_step: dict[int, int]
    #: key -> the steps that need it, increasing
    uses: list[list[int]]

    @property
    def n(self) -> int:
        return len(self.keys)

    def step_of(self, token: int, layer: int) -> int:
        """The step at which the engine handles `layer` of `token` (a decode token, or a prompt's first)."""
        return self.first_step[token] + layer

    def next_use(self, key: int, after: int) -> int:
        """The first step >= `after` that needs `key` (NEVER if none)."""
        u = self.uses[key]
        i = bisect.bisect_left(u, after)
        return u[i] if i < len(u) else NEVER

    def last_use_before(self, key: int, before: int) -> int:
        """The last step < `before` that needs `key` (-1 if none)."""
        u = self.uses[key]
        i = bisect.bisect_left(u, before)
        return u[i - 1] if i else -1


def build_steps(trace: Trace, ids: np.ndarray, *, prefill: bool, max_tokens: int) -> Steps:
    """The steps of a replay of `trace` with the experts `ids` [T, L, k] (-1: not run)."""
    L, E = trace.model.layers, trace.model.experts
    offsets = (np.arange(L) * E)[None, :, None]
    keys_tl = np.where(ids >= 0, ids + offsets, -1).tolist()  # [T][L][k] keys
    out = Steps(L, E, [], [], [], [], [], [], {}, [[] for _ in range(L * E)])
    seq = trace.seq.tolist()
    for step in replay_steps(trace, prefill, max_tokens, 0):
        if step[0] == "prefill":
            prompt = step[1]
            out.first_step[prompt[0]] = out.n
            for layer in range(L):
                counts: dict[int, int] = {}
                for t in prompt:
                    for k in keys_tl[t][layer]:
                        if k >= 0:
                            counts[k] = counts.get(k, 0) + 1
                order = sorted(counts, key=lambda k: (-counts[k], k))
                _add(out, order, [counts[k] for k in order], True, prompt[0], layer, seq[prompt[0]])
        else:
            t = step[1]
            out.first_step[t] = out.n
            for layer in range(L):
                ks = [k for k in keys_tl[t][layer] if k >= 0]
                _add(out, ks, [1] * len(ks), False, t, layer, seq[t])
    return out


def _add(out: Steps, keys: list[int], count: list[int], is_prefill: bool, token: int, layer: int,
         sequence: int) -> None:
    s = out.n
    out.keys.append(keys)
    out.count.append(count)
    out.is_prefill.append(is_prefill)
    out.token.append(token)
    out.layer.append(layer)
    out.sequence.append(sequence)
    for k in keys:
        out.uses[k].append(s)
