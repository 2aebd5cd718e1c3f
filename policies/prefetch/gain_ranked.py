"""`gain_ranked`: prefetch the candidates whose estimated benefit is highest, and only while it is positive.

Source: HybriMoE (Zhong et al., 2025), which ranks candidate expert loads by their simulated
benefit (the time a load saves against what it costs) instead of prefetching a fixed count.
Simplified: the benefit is the closed-form estimate below, not HybriMoE's simulation of its
CPU-GPU schedule; no CPU computation of experts is planned here (that is the placement policy's).

After layer l of decode token t gates, every expert e of layers m = l + d (d = 1..`depth`,
m < L) that is neither resident nor loading is a candidate, with

    benefit(e) = p_d(e) * min(load_s, d * layer_s)  -  q(victim) * load_s

- `load_s` = `ctx.cost.load_s(expert bytes)` (link latency + bytes / bandwidth): the stall a
  demand load of e would cost, and what a wrongly evicted expert costs to load again;
- `layer_s` = `ctx.cost.attention_decode_s(pos)` + k * `ctx.cost.expert_s` (one decode layer
  at the token's context with its k experts resident): a prefetch issued now hides at most the
  d layers of compute before e's layer needs it;
- p_d(e), the probability that e runs at layer m (`estimate`):
  * `pregate` (what `auto`, the default, picks when the trace has `pregate_d`):
    min(1, k * softmax(pregate_d[t, l])_e), the router's weight scaled to the k experts it runs;
  * `coact` (`auto` without `pregate_d`): co-activation counts of the decode tokens this policy
    has seen, each counted once its step is over (at the first call for a lower layer than the
    call before it: the next token, or the next batched step of a serving run): with A the
    experts token t runs at l, p_d(e) = mean over a in A of (C[l, a, e] + s * prior_m(e)) / (N[l, a] + s),
    C[l, a, e] = past tokens that ran a at l and e at m, N[l, a] = past tokens that ran a at l,
    prior_m(e) = (M[m, e] + k / E) / (n + 1) (M[m, e] past tokens that ran e at m, n past tokens),
    s = `smoothing`; with no past every expert has k / E;
- the victim: none while the cache has room for a whole expert (`ctx.cache.free_bytes()`, one
  slot taken per prefetch issued in this call), and none with `admit=on_use` (a prefetch then takes
  a staging buffer, no slot); else it is assumed to be the evictable resident of layer m with the
  lowest q (what a per-layer cache, `scope=layer`, evicts from; the cheapest one: an optimistic
  assumption about the cache policy's choice; ties: lower key), not one already assumed displaced
  in this call, and, if layer m has none, the cheapest evictable resident of any layer. q is its
  probability of use before e's use: p_{j-l}(v) for a resident of layer j in l+1..m, 0 for any
  other layer (the horizon is this token). `victim=mean` takes instead the mean q of layer m's
  evictable residents not yet assumed displaced (a victim the cache policy picks without regard
  to q; the cheapest is the one then counted displaced); `victim=none` drops the victim term.
Candidates are issued greedily: the one of highest benefit (ties: the higher p * hidden time,
then lower depth, then lower expert id), recomputed with the victims already assumed, while it
is > 0, at most `count` per call over all depths. The summary's `prefetch_used` / `_late` /
`_wasted` tell how the estimate fared.

Engine knobs as `pregate`'s (`policies.prefetch.learned.ENGINE_KNOBS`). Errors (UserError, naming
the knob): depth, count, chunks < 1; smoothing <= 0; an unknown estimate, victim or admit;
`estimate=pregate` on a trace without `pregate_1..depth`; no cost model in the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.prefetch.learned import EngineKnobs, apply_engine_knobs
from policies.registry import PREFETCH
from sim.engine.cache import ABSENT, RESIDENT
from sim.errors import UserError

ESTIMATES = ("auto", "pregate", "coact")
VICTIMS = ("cheapest", "mean", "none")


def pregate_probabilities(logits: np.ndarray, k: int) -> np.ndarray:
    """[..., E] pre-gating logits -> min(1, k * softmax): the estimate of `estimate=pregate`."""
    z = logits - logits.max(axis=-1, keepdims=True)
    s = np.exp(z)
    return np.minimum(1.0, k * s / s.sum(axis=-1, keepdims=True))


@PREFETCH.register("gain_ranked")
class GainRanked(PrefetchPolicy):
    @dataclass
    class Knobs(EngineKnobs):
        depth: int = 1  # layers ahead whose experts are candidates
        count: int = 2  # prefetches per call at most (over all depths)
        estimate: str = "auto"  # auto (pregate when the trace has pregate_d, else coact) | pregate | coact
        smoothing: float = 1.0  # coact: pseudo-count s pulling each estimate to the layer's past frequency
        victim: str = "cheapest"  # cheapest | mean | none (the victim term of the module docstring)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 1:
            raise UserError(f"prefetch.depth must be >= 1, got {knobs.depth}")
        if knobs.count < 1:
            raise UserError(f"prefetch.count must be >= 1, got {knobs.count}")
        if not knobs.smoothing > 0.0:
            raise UserError(f"prefetch.smoothing must be > 0, got {knobs.smoothing}")
        if knobs.estimate not in ESTIMATES:
            raise UserError(f"prefetch.estimate must be one of {', '.join(ESTIMATES)}, got {knobs.estimate!r}")
        if knobs.victim not in VICTIMS:
            raise UserError(f"prefetch.victim must be one of {', '.join(VICTIMS)}, got {knobs.victim!r}")
        apply_engine_knobs(self, knobs, ctx)
        if ctx.cost is None:
            raise UserError("prefetch 'gain_ranked' needs the run's cost model (ctx.cost) to weigh its loads")
        tr = ctx.trace
        L, E, k = ctx.layers, ctx.experts, ctx.top_k
        missing = [d for d in range(1, knobs.depth + 1) if d not in tr.pregate]
        if knobs.estimate == "pregate" and missing:
            raise UserError(f"prefetch.estimate=pregate needs trace columns "
                            f"{', '.join(f'pregate_{d}' for d in missing)}, which this trace lacks; "
                            f"use prefetch.estimate=coact (or auto)")
        #: depth -> [T, L, E] p_d (pregate) or None (coact, from the run's past)
        self.pregate = {d: (pregate_probabilities(tr.pregate[d].astype(np.float64), k)
                            if knobs.estimate != "coact" and d in tr.pregate else None)
                        for d in range(1, knobs.depth + 1)}
        plan = ctx.gating_plan
        ids = (plan.ids if plan is not None else tr.experts).astype(np.int64)
        self.ids = ids  # [T, L, k], -1: not run
        self.coact = {d: np.zeros((L, E, E)) for d in self.pregate if self.pregate[d] is None}
        self.freq = np.zeros((L, E))  # past tokens that ran expert e at layer l (N and M of the docstring)
        self.n_past = 0
        self.last_layer = -1
        self.step_tokens: list[int] = []  # the tokens of the step running now (learned once it is over)
        self.L, self.E, self.k = L, E, k
        self.load_s = ctx.cost.load_s(ctx.preset.expert_bytes)
        self.expert_bytes = ctx.preset.expert_bytes
        self.k_expert_s = k * ctx.cost.expert_s
        self.pos = tr.pos.tolist()

    # ------------------------------------------------------------------ the estimate
    def _learn(self, j: int) -> None:
        """Past token j joins the co-activation counts."""
        ids = self.ids[j]  # [L, k]
        L = self.L
        ran = ids >= 0
        layer_idx, slot = np.nonzero(ran)
        np.add.at(self.freq, (layer_idx, ids[layer_idx, slot]), 1.0)
        for d, C in self.coact.items():
            for src in range(L - d):
                a = ids[src][ran[src]]
                b = ids[src + d][ran[src + d]]
                if a.size and b.size:
                    C[src][np.ix_(a, b)] += 1.0
        self.n_past += 1

    def probabilities(self, t: int, layer: int, d: int) -> np.ndarray:
        """[E] p_d(e) for the experts of layer `layer + d`, estimated at `layer` of token t."""
        pre = self.pregate[d]
        if pre is not None:
            return pre[t, layer]
        m, E, k, s = layer + d, self.E, self.k, self.knobs.smoothing
        prior = (self.freq[m] + k / E) / (self.n_past + 1)  # [E]
        a = self.ids[t, layer]
        a = a[a >= 0]
        if a.size == 0:
            return prior
        C = self.coact[d][layer][a]  # [|A|, E]
        return ((C + s * prior[None, :]) / (self.freq[layer][a][:, None] + s)).mean(axis=0)

    # ------------------------------------------------------------------ the decision
    def on_layer(self, t: int, layer: int) -> list[int]:
        if layer < self.last_layer:  # a new step: the last one's tokens are past
            if self.coact:
                for j in self.step_tokens:
                    self._learn(j)
            self.step_tokens.clear()
        self.last_layer = layer
        if self.coact and t not in self.step_tokens:
            self.step_tokens.append(t)
        L, E = self.L, self.E
        depths = [d for d in range(1, self.knobs.depth + 1) if layer + d < L]
        if not depths:
            return []
        cache = self.ctx.cache
        state = cache.state
        layer_s = self.ctx.cost.attention_decode_s(int(self.pos[t])) + self.k_expert_s
        prob = {d: self.probabilities(t, layer, d).tolist() for d in depths}
        cands = []  # (gain, d, e, key)
        for d in depths:
            hide = min(self.load_s, d * layer_s)
            base = (layer + d) * E
            p = prob[d]
            for e in range(E):
                if state[base + e] == ABSENT:
                    cands.append((p[e] * hide, d, e, base + e))
        if not cands:
            return []
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        staged = self.admit_on_use
        room = int(cache.free_bytes() // self.expert_bytes) if self.expert_bytes > 0 else 0
        no_victim = staged or self.knobs.victim == "none"
        taken: set[int] = set()
        out: list[int] = []
        while cands and len(out) < self.knobs.count:
            best = None
            victims: dict[int, tuple[float, int | None]] = {}  # depth -> its victim, this round
            for i, (gain, d, _e, _key) in enumerate(cands):
                if best is not None and gain <= best[0]:  # in gain order: benefit <= gain, none later wins
                    break
                if no_victim or room > 0:
                    q, victim = 0.0, None
                else:
                    if d not in victims:
                        victims[d] = self._victim(layer, d, prob, taken)
                    q, victim = victims[d]
                benefit = gain - q * self.load_s
                if best is None or benefit > best[0]:
                    best = (benefit, i, victim)
            benefit, i, victim = best
            if not benefit > 0.0:
                break
            out.append(cands.pop(i)[3])
            if no_victim or room > 0:
                room -= 1
            elif victim is not None:
                taken.add(victim)
        return out

    def _victim(self, layer: int, d: int, prob: dict[int, list[float]], taken: set[int]) -> tuple[float, int | None]:
        """(q, key) of the victim a prefetch for layer `layer + d` is assumed to displace (the
        module docstring), or (0, None) if nothing can be evicted."""
        cache, E = self.ctx.cache, self.E
        state, pinned = cache.state, cache.pinned
        m = layer + d

        def q(key: int) -> float:
            j = key // E
            if layer < j <= m and (j - layer) in prob:
                return prob[j - layer][key % E]
            return 0.0

        best = None
        total, n = 0.0, 0
        for key in range(m * E, (m + 1) * E):
            if state[key] == RESIDENT and key not in pinned and key not in taken:
                c = q(key)
                total += c
                n += 1
                if best is None or c < best[0]:
                    best = (c, key)
        if best is not None:
            return (total / n, best[1]) if self.knobs.victim == "mean" else best
        for key, st in enumerate(state):  # none in layer m: the cheapest anywhere
            if st == RESIDENT and key not in pinned and key not in taken:
                c = q(key)
                if best is None or c < best[0]:
                    best = (c, key)
                    if c == 0.0:
                        break
        return best if best is not None else (0.0, None)
