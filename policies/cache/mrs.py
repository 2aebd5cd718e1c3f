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

When scores move: the policy sets `observes_steps`, so the engine tells it of every step's rows
at each layer (`on_step(rows, layer)`) once the layer has gated and before any of its loads or
accesses: the layer's scores take exactly those rows, in order (several rows: the closed form of
the EMA over them), each (row, layer) once (a row run again, e.g. a preempted request recomputed,
is not folded twice). So a demand victim is chosen on scores that include the step, as HybriMoE
updates at the gate, and nothing of a row is read before its step runs: a decode token is one
row; the replay's prefill folds its prompt at once; a serving step folds the prompt chunks it
runs (never a later chunk) and all of its decode rows. A prefetch's victims in a later layer see
that layer's scores up to its last step (nothing of a layer that has not gated is read).

Simplified: the released code updates on a batch's first token only; we fold every row of the
step. A step folds its rows even when the layer runs no expert through the cache (all on the CPU,
or dropped): the routing is known at the gate. No prefetching from the scores (HybriMoE's
prefetcher is separate).

Errors: `cache.alpha` outside [0, 1), `cache.top_p` above the layer's experts, `cache.scope`
other than layer|global and bad `cache.sizes` are `UserError`s naming the knob.
Cost: an access is O(1), a step O(E) per row; a miss at `scope=layer` scans the layer's residents,
at `scope=global` is a few numpy passes over the residents (an argmin; a sort only when one victim
is not enough room).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.partition import evictable_members, layer_partitions
from policies.registry import CACHE
from sim.engine.cache import RESIDENT
from sim.errors import UserError


@CACHE.register("mrs")
class MRS(CachePolicy):
    observes_steps = True  # the scores take each step's rows at the gate (`on_step`)

    @dataclass
    class Knobs:
        alpha: float = 0.5  # weight of the old score (HybriMoE's released code: 0.5)
        top_p: int = 0  # routing scores kept per step (0: 2 * top_k, the paper's choice)
        scope: str = "layer"  # "layer" (per-layer partitions) or "global"
        sizes: list[int] | None = field(default=None)  # per-layer slots (scope=layer); default uniform

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        sizes = layer_partitions(knobs, ctx)
        if not 0.0 <= knobs.alpha < 1.0:
            raise UserError(f"cache.alpha must be in [0, 1) (the weight of the old score), got {knobs.alpha}")
        L, E, k = ctx.layers, ctx.experts, ctx.top_k
        if knobs.top_p > E:
            raise UserError(f"cache.top_p must be at most the layer's {E} experts (0: 2 * top_k), got {knobs.top_p}")
        self.alpha = float(knobs.alpha)
        self.top_p = int(knobs.top_p) if knobs.top_p else min(E, 2 * k)
        self.sizes = sizes
        self.per_layer = sizes is not None
        self.E = E
        tr = ctx.trace
        self.logits = tr.logits  # [T, L, E] or None
        self.experts, self.weights = tr.experts, tr.weights
        T = tr.num_tokens
        self.score = np.zeros((L, E))  # [L, E] the score of each expert (updated in place)
        self.flat_score = self.score.reshape(-1)  # [L * E] a view of it, by key
        self.applied = [bytearray(T) for _ in range(L)]  # (row, layer) steps already in the scores
        self.last = [0] * (L * E)  # use clock, for the LRU tie-break
        self.clock = 0
        self.members: list[set[int]] = [set() for _ in range(L if self.per_layer else 1)]
        if not self.per_layer:  # scope=global's victims are numpy passes over a mask of the members
            self.member = np.zeros(L * E, bool)
            self.maybe_loading: set[int] = set()  # members whose load may not have ended (pruned at a miss)

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

    def _fold_rows(self, rows: list[int], layer: int) -> None:
        """The EMA over several rows in order, closed form:
        `a^n * score + (1 - a) * sum_i a^(n-1-i) s_i` (as `step_scores`)."""
        a, n = self.alpha, len(rows)
        w = (1.0 - a) * a ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self.score[layer] = a ** n * self.score[layer] + w @ self.step_scores(rows, layer)

    # ------------------------------------------------------------------ what the policy is told
    def on_step(self, rows: list[int], layer: int) -> None:
        """Fold the step's rows at `layer` into its scores, in order, each (row, layer) once."""
        done = self.applied[layer]
        if len(rows) == 1:  # a decode token: the hot path, no batch arrays
            r = rows[0]
            if not done[r]:
                done[r] = 1
                self._fold_row(r, layer)
            return
        todo = []
        for r in rows:
            if not done[r]:
                done[r] = 1
                todo.append(r)
        if len(todo) == 1:
            self._fold_row(todo[0], layer)
        elif todo:
            self._fold_rows(todo, layer)

    def on_access(self, key: int, t: int) -> None:
        self.clock += 1
        self.last[key] = self.clock

    def on_insert(self, key: int, t: int) -> None:
        self.members[key // self.E if self.per_layer else 0].add(key)
        self.clock += 1
        self.last[key] = self.clock
        if not self.per_layer:
            self.member[key] = True
            self.maybe_loading.add(key)

    def on_evict(self, key: int) -> None:
        self.members[key // self.E if self.per_layer else 0].discard(key)
        if not self.per_layer:
            self.member[key] = False
            self.maybe_loading.discard(key)

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        if self.per_layer:
            state, pinned, last, E = cache.state, cache.pinned, self.last, self.E
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
        return self._global_victims(nbytes - free)

    def _global_victims(self, need: float) -> list[int] | None:
        """The evictable members (resident, not pinned) by (score, last use, key), lowest first,
        until `need` bytes are freed (None if they cannot free it): an argmin over a numpy mask of
        the members; the whole order (a sort) only when the first victim is not enough."""
        cache, last = self.ctx.cache, self.last
        idx = evictable_members(cache, self.member, self.maybe_loading)  # ascending keys
        if not len(idx):
            return None
        sc = self.flat_score[idx]
        low = sc.min()
        tied = idx[sc == low]
        first = int(tied[0]) if len(tied) == 1 else min(tied.tolist(), key=lambda k: (last[k], k))
        if need - cache.size_bytes[first] <= 0:
            return [first]
        flat = self.flat_score
        ranked = sorted((float(flat[k]), last[k], k) for k in idx.tolist())  # (its first is `first`)
        out = []
        for _, _, k in ranked:
            if need <= 0:
                break
            out.append(k)
            need -= cache.size_bytes[k]
        return out if need <= 0 else None
