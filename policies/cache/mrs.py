"""`mrs`: HybriMoE's "Minus Recent Score" cache: evict the resident with the lowest routing-score EMA.

Source: S. Zhong et al., "HybriMoE: Hybrid CPU-GPU Scheduling and Cache Management for Efficient
MoE Inference", DAC 2025 (arXiv 2504.05897), section IV-D, and its released code
(`KScoreAwareCache`: alpha 0.5, top-p 12 for DeepSeek's top-6).

Rule: each layer keeps a score per expert, updated once per (token, layer) step:
`score = alpha * score + (1 - alpha) * s_t`, where s_t is the token's routing probability of
each expert at that layer, cut to its `top_p` largest (the others count 0: "TopP(s)"). The
paper writes `S = a * TopP(s) + (1 - a) * S` (a = 1 - alpha here); the released code's 0.5 is
the same in both conventions and is our default. A load that needs room evicts the evictable
resident with the lowest score; ties: least recently used (an access or insert is a use), then
the lower key. `scope=layer` (default) evicts within the layer's partition (`sizes`, else the
uniform split, as `lru`); `scope=global` compares scores across layers (each layer's s_t sums to
at most 1, so they are comparable) and is HybriMoE's cross-layer cache.

s_t: the softmax of the trace's router `logits` when it has them (whatever `model.routing`
says), else the trace's top-k weights renormalised to sum 1, the other experts 0 (a trace of
ids and weights only, such as the Mixtral HumanEval one). A trace whose weights were not
recorded (uniform placeholders) makes the score an EMA of routing frequency.

When scores move (lazily, cheap): the engine tells the policy of each active expert's use
(`on_access(key, t)`), so a layer's scores take step (t, layer) the first time that step is seen:
at its first access, or at `victims` asked at step (t, layer) (the layer has gated then, so its
routing is known: a demand victim is chosen on scores that include the token, as HybriMoE updates
at the gate). A prefetch's victims in a later layer see that layer's scores up to the last token
(nothing of a layer that has not gated is read). A prefill batch is told at its first row: its
step applies every row of that prompt run (the same sequence's consecutive prompt rows, read from
`ctx.trace.is_decode` and `seq`) not applied yet, in order; each (row, layer) is applied once.

Simplified: a serving batch of several decode rows is told at its first row only, so the other
rows' routing is not seen (the contract names one token per access). The released code updates
on a batch's first token only; we apply the whole prompt run instead. A step at which a layer
runs no expert through the cache (all on the CPU, or dropped) does not move that layer's scores.
No prefetching from the scores (HybriMoE's prefetcher is separate).

Errors: `cache.alpha` outside [0, 1), `cache.top_p` above the layer's experts, `cache.scope`
other than layer|global and bad `cache.sizes` are `UserError`s naming the knob.
Cost: an access is O(1) (a step's first access O(E)); a miss scans the scope's residents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.partition import check_sizes, uniform_sizes
from policies.registry import CACHE
from sim.engine.cache import RESIDENT
from sim.errors import UserError


def prompt_run_ends(seq: np.ndarray, is_decode: np.ndarray) -> np.ndarray:
    """[T] exclusive end of each row's run: for a prompt row, the end of the run of consecutive
    prompt rows of its sequence; for a decode row, the next row."""
    T = len(seq)
    if T == 0:
        return np.zeros(0, np.int64)
    prompt = ~np.asarray(is_decode, bool)
    seq = np.asarray(seq)
    # a run starts where the sequence or the phase changes, and at every decode row
    start = np.ones(T, bool)
    start[1:] = (seq[1:] != seq[:-1]) | ~prompt[1:] | ~prompt[:-1]
    run = np.cumsum(start) - 1
    starts = np.flatnonzero(start)
    ends = np.append(starts[1:], T)
    return ends[run]


@CACHE.register("mrs")
class MRS(CachePolicy):
    @dataclass
    class Knobs:
        alpha: float = 0.5  # weight of the old score (HybriMoE's released code: 0.5)
        top_p: int = 0  # routing scores kept per step (0: 2 * top_k, the paper's choice)
        scope: str = "layer"  # "layer" (per-layer partitions) or "global"
        sizes: list[int] | None = field(default=None)  # per-layer slots (scope=layer); default uniform

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.scope not in ("layer", "global"):
            raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
        if not 0.0 <= knobs.alpha < 1.0:
            raise UserError(f"cache.alpha must be in [0, 1) (the weight of the old score), got {knobs.alpha}")
        L, E, k = ctx.layers, ctx.experts, ctx.top_k
        if knobs.top_p > E:
            raise UserError(f"cache.top_p must be at most the layer's {E} experts (0: 2 * top_k), got {knobs.top_p}")
        self.alpha = float(knobs.alpha)
        self.top_p = int(knobs.top_p) if knobs.top_p else min(E, 2 * k)
        self.per_layer = knobs.scope == "layer"
        self.E = E
        if self.per_layer:
            self.sizes = (check_sizes(knobs.sizes, ctx.capacity_slots, L, E) if knobs.sizes
                          else uniform_sizes(ctx.capacity_slots, L))
        else:
            if knobs.sizes:
                raise UserError("cache.sizes applies to cache.scope=layer only")
            self.sizes = None
        tr = ctx.trace
        self.logits = tr.logits  # [T, L, E] or None
        self.experts, self.weights = tr.experts, tr.weights
        T = tr.num_tokens
        self.score = np.zeros((L, E))  # [L, E] the score of each expert
        self.run_end = prompt_run_ends(tr.seq, tr.is_decode).tolist()
        self.applied = [bytearray(T) for _ in range(L)]  # (row, layer) steps already in the scores
        self.seen_t = [-1] * L  # the last row each layer took (the hot path's shortcut)
        self.last = [0] * (L * E)  # use clock, for the LRU tie-break
        self.clock = 0
        self.members: list[set[int]] = [set() for _ in range(L if self.per_layer else 1)]

    # ------------------------------------------------------------------ scores
    def step_scores(self, rows: list[int], layer: int) -> np.ndarray:
        """[n, E] s_t of `rows` at `layer`: routing probabilities cut to their top_p (others 0)."""
        E = self.E
        if self.logits is not None:
            lg = np.asarray(self.logits[rows, layer, :], dtype=np.float64)
            s = np.exp(lg - lg.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
        else:
            w = np.asarray(self.weights[rows, layer, :], dtype=np.float64)
            total = w.sum(axis=1, keepdims=True)
            w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
            s = np.zeros((len(rows), E))
            np.put_along_axis(s, np.asarray(self.experts[rows, layer, :], dtype=np.int64), w, axis=1)
        if self.top_p < E:  # keep the top_p largest per row (ties: the lower expert id)
            drop = np.argsort(-s, axis=1, kind="stable")[:, self.top_p:]
            np.put_along_axis(s, drop, 0.0, axis=1)
        return s

    def _fold_row(self, r: int, layer: int) -> None:
        """`score = alpha * score + (1 - alpha) * s_r` at `layer` for one row (as `step_scores`)."""
        a, sc = self.alpha, self.score[layer]
        sc *= a
        if self.logits is not None:
            lg = self.logits[r, layer].astype(np.float64)
            s = np.exp(lg - lg.max())
            s *= (1.0 - a) / s.sum()
            if self.top_p < self.E:
                s[np.argsort(-s, kind="stable")[self.top_p:]] = 0.0
            sc += s
            return
        w = self.weights[r, layer].astype(np.float64)
        total = w.sum()
        if total <= 0:
            return
        ids = self.experts[r, layer]
        if self.top_p < len(ids):  # (only when top_p < top_k)
            keep = np.lexsort((ids, -w))[:self.top_p]  # the largest, ties: the lower expert id
            ids, w = ids[keep], w[keep]
        sc[ids] += (1.0 - a) / total * w

    def _see(self, t: int, layer: int) -> None:
        """Fold step (t, layer) into the layer's scores, once (a prompt row: its whole run)."""
        self.seen_t[layer] = t
        if t < 0:
            return
        done = self.applied[layer]
        if self.run_end[t] == t + 1:  # one row (a decode token): the hot path, no batch arrays
            if not done[t]:
                done[t] = 1
                self._fold_row(t, layer)
            return
        rows = [r for r in range(t, self.run_end[t]) if not done[r]]
        if not rows:
            return
        for r in rows:
            done[r] = 1
        a, n = self.alpha, len(rows)
        # the EMA over n rows in order, closed form: a^n * score + (1 - a) * sum_i a^(n-1-i) s_i
        w = (1.0 - a) * a ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self.score[layer] = a ** n * self.score[layer] + w @ self.step_scores(rows, layer)

    # ------------------------------------------------------------------ what the policy is told
    def on_access(self, key: int, t: int) -> None:
        self.clock += 1
        self.last[key] = self.clock
        layer = key // self.E
        if self.seen_t[layer] != t:
            self._see(t, layer)

    def on_insert(self, key: int, t: int) -> None:
        self.members[key // self.E if self.per_layer else 0].add(key)
        self.clock += 1
        self.last[key] = self.clock

    def on_evict(self, key: int) -> None:
        self.members[key // self.E if self.per_layer else 0].discard(key)

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        if nbytes > 0 and self.seen_t[layer] != t:  # step (t, layer) has gated ("0 bytes": a resize)
            self._see(t, layer)
        cache = self.ctx.cache
        state, pinned, last, E = cache.state, cache.pinned, self.last, self.E
        if self.per_layer:
            kl = key // E
            if cache.per_layer[kl] < self.sizes[kl] and cache.capacity_bytes - cache.used_bytes >= nbytes:
                return []
            sc = self.score[kl].tolist()
            best = None
            for k in self.members[kl]:
                if state[k] == RESIDENT and k not in pinned:
                    rank = (sc[k - kl * E], last[k], k)
                    if best is None or rank < best:
                        best = rank
            return None if best is None else [best[2]]
        free = cache.free_bytes()
        if free >= nbytes:
            return []
        flat = self.score.ravel().tolist()
        ranked = sorted((flat[k], last[k], k) for k in self.members[0] if state[k] == RESIDENT and k not in pinned)
        out, need = [], nbytes - free
        for _, _, k in ranked:
            if need <= 0:
                break
            out.append(k)
            need -= cache.size_bytes[k]
        return out if need <= 0 else None
