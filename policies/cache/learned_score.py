"""`learned_score`: evict the expert a fitted logistic recency/frequency score rates least likely reused.

The score is a logistic regression fitted offline on a profile trace (`fit=FIT_DIR`) to predict
"used again within the next H steps of its layer".

Source: FlashMoE (Kim et al., "Reducing SSD I/O Bottlenecks via ML-Based Cache Replacement for
MoE Inference on Edge Devices", arXiv:2601.17063, January 2026; the project notes call it 2025):
a lightweight learned cache policy that combines recency and frequency signals for experts
offloaded to SSD. The idea is the learned-cache literature's (eviction scores learned from
recency/frequency features, e.g. LRB, Song et al., NSDI 2020; LeCaR/CACHEUS, which learn a mix of
LRU and LFU). Ours, written from those descriptions and not from FlashMoE's model: a plain
logistic regression on a handful of features, fitted once before the run on a separate profile
trace (never online), with a fixed label horizon; no neural model, no online retraining.

Features of a resident expert, on its layer's own clock (one step per token at which the layer ran;
a prefill batch is one step), measured as of the layer's latest step, or for the layer whose step
is running (the `layer` of `victims`) as of that step when it has not yet used an expert in it
(its candidates are not active in it, as the fit's samples are not used at their step):
  recency    log1p(steps since its last use at its layer; insertion counts as a use, as in `lru`)
  frequency  log1p(uses so far; kept across evictions, as in `lfu`)
  decayed    log1p(exponentially decayed uses: each use adds 1, halved every `half_life_steps`)
  share      its uses / all expert uses of its layer so far (its share of its layer's routing)
chosen by `features` (comma-separated; default the first three).

Fit (`fit=FIT_DIR`, via `policies.fit.fit_trace`, which refuses the replayed trace): the fit
trace's decode tokens, in trace order as one stream (the replay's cache persists across
sequences), per layer. At every step s, every expert of the layer seen before and not used at s
is one sample, with the features above and label 1 if it is used in steps s+1..s+H
(`horizon_steps` = H; 0: the uniform partition size C // L, at least 1); samples whose horizon
runs past the end of the trace are dropped (censored). The samples are all seen experts, not
only those a cache would hold (simpler; the ranking, not calibration, is what is used). A long
profile gives one sample per seen expert per step (tens of millions for a large model): at most
`max_samples` are kept (default 200000; 0: all), a uniform subsample without replacement drawn
by `numpy.random.default_rng(0)` over the samples in (layer, step, expert) order, so the fit is
deterministic. The samples are built with numpy from each expert's use events, with the same
arithmetic as a step-by-step loop. The model is fitted on standardised features by L-BFGS
(`scipy.optimize.minimize`, from zero, with an analytic gradient; margins as elementwise
products summed, never a BLAS product, so the result does not depend on the thread count:
deterministic) on the mean log-loss plus `l2`/2 * |w|^2 (bias
unpenalised), then mapped back to raw features: `self.weights_` {feature: weight},
`self.bias_`, and `self.fit_samples_`, `self.fit_positive_share_` for inspection.

Eviction: the evictable resident (resident, not pinned) of the scope with the lowest score
w . x (the log-odds, so the lowest predicted probability). `scope=layer`: the requesting
layer's partition (`sizes`, or a uniform split), one victim; `scope=global`: any layer, as many
as the load needs (lowest scores first); it ranks by each layer's own probability and ignores how
soon each layer runs next (on Mixtral HumanEval it loses to `scope=layer`). Ties: least recently
used (a global access clock), then the lower key. Nothing evictable: None (the engine uses a
staging buffer for a demand load, skips a prefetch).

Errors (`UserError`, naming the knob): no `fit`, or one that is the replayed trace, a part of it
or contains it, or of another model shape (`cache.fit`); unknown `features`;
`half_life_steps` <= 0; a profile giving no samples or samples of one label only (`cache.fit` /
`cache.horizon_steps`). Cost: O(1) per access; per eviction at `scope=layer` O(the layer's
residents) (a few `log1p` each); at `scope=global` an argmin over a numpy array of the
residents' scores, each kept until its features move (a layer's are scored again once per step
of that layer, a resident's when it is used): O(residents) numpy work and O(scores that moved)
Python work per eviction, with the same values, so the same victims, as scoring each anew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.partition import evictable_members, layer_partitions
from policies.fit import fit_trace
from policies.registry import CACHE
from sim.engine.cache import RESIDENT
from sim.errors import UserError

FEATURES = ("recency", "frequency", "decayed", "share")


def parse_features(text: str) -> list[str]:
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [n for n in names if n not in FEATURES]
    if not names or bad or len(set(names)) != len(names):
        raise UserError(f"cache.features must be a comma-separated subset of {','.join(FEATURES)} (each once), "
                        f"got {text!r}")
    return names


def fit_samples(ids: np.ndarray, experts: int, horizon_steps: int, half_life_steps: float,
                features: list[str], max_samples: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X [n, len(features)] raw features, y [n] labels) from decode ids [T, L, k] (-1 = not run);
    see the module docstring. Steps of a layer are the rows in which it runs an expert. Samples
    are ordered by layer, step, expert; `max_samples` > 0 keeps at most that many, a uniform
    subsample without replacement (`numpy.random.default_rng(seed).choice`, in that order).

    Vectorised: the features come from each (layer, expert)'s use events (its steps and uses per
    step), the decayed uses by their recurrence run over all of them at once by use index, with
    the same floating-point operations as a use-by-use loop (powers of the decay from one table of
    `g ** d`, `math.log1p` per value), so the samples equal that loop's exactly."""
    T, L, _ = ids.shape
    E = int(experts)
    H = int(horizon_steps)
    g = 0.5 ** (1.0 / half_life_steps)
    layers = []  # per layer: (n, event experts, event steps, first use step per expert, uses so far per step)
    chains, steps, counts = [], [], []  # every layer's use events: (layer * E + expert, step, uses), sorted
    n_elig = []
    for layer in range(L):
        lid = np.asarray(ids[:, layer, :], dtype=np.int64)
        lid = lid[(lid >= 0).any(axis=1)]  # the layer's steps
        n = len(lid)
        ii, jj = np.nonzero(lid >= 0)
        ee = lid[ii, jj]
        code, cnt = np.unique(ee * max(n, 1) + ii, return_counts=True)  # by expert, then step
        ev_e, ev_i = code // max(n, 1), code % max(n, 1)
        first = np.full(E, n, np.int64)
        np.minimum.at(first, ev_e, ev_i)
        uses = np.cumsum(np.bincount(ii, minlength=n))  # [n] the layer's uses up to each step
        layers.append((n, ev_e, ev_i, first, uses))
        chains.append(layer * E + ev_e)
        steps.append(ev_i)
        counts.append(cnt)
        n_elig.append(int(_eligible(n, ev_e, ev_i, first, E, H).sum()))
    chain = np.concatenate(chains) if chains else np.zeros(0, np.int64)
    step = np.concatenate(steps) if steps else np.zeros(0, np.int64)
    cnt = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    nmax = max((x[0] for x in layers), default=0)
    gpow = np.array([g ** d for d in range(nmax + 1)], dtype=np.float64)  # g ** gap as a Python loop has it
    # the decayed uses after each event: d = d_prev * g ** (its step - the previous one's) + 1 per use
    M = len(chain)
    dec = np.empty(M)
    if M:
        head = np.ones(M, bool)
        head[1:] = chain[1:] != chain[:-1]
        starts = np.flatnonzero(head)
        j = np.arange(M) - np.repeat(starts, np.diff(np.append(starts, M)))  # use index within its chain
        order = np.argsort(j, kind="stable")
        bounds = np.searchsorted(j[order], np.arange(int(j.max()) + 2)).tolist()
        gap = np.zeros(M, np.int64)
        gap[1:] = step[1:] - step[:-1]
        for u in range(len(bounds) - 1):
            sel = order[bounds[u]:bounds[u + 1]]
            d = np.ones(len(sel)) if u == 0 else dec[sel - 1] * gpow[gap[sel]] + 1.0
            extra = cnt[sel] - 1  # an expert twice in a step: + 1 again (g ** 0 = 1)
            while extra.any():
                more = extra > 0
                d[more] += 1.0
                extra -= more
            dec[sel] = d
    freq_ev = np.empty(M, np.int64)  # uses of its expert up to and including each event
    if M:
        total = np.cumsum(cnt)
        freq_ev[:] = total - np.repeat(total[starts] - cnt[starts], np.diff(np.append(starts, M)))
    N = sum(n_elig)
    chosen = None
    if max_samples and N > max_samples:
        chosen = np.sort(np.random.default_rng(seed).choice(N, size=int(max_samples), replace=False))
    cols: dict[str, list[np.ndarray]] = {name: [] for name in features}
    ys: list[np.ndarray] = []
    off = ev_off = 0
    for layer, (n, ev_e, ev_i, first, uses) in enumerate(layers):
        pos = np.flatnonzero(_eligible(n, ev_e, ev_i, first, E, H))  # by step, then expert
        if chosen is not None:
            lo, hi = np.searchsorted(chosen, [off, off + len(pos)])
            pos = pos[chosen[lo:hi] - off]
        off += n_elig[layer]
        m_ev = len(ev_e)
        if len(pos):
            i, e = pos // E, pos % E
            keys = ev_e * (n + 1) + ev_i
            m = np.searchsorted(keys, e * (n + 1) + i, side="right") - 1  # its last use before step i
            since = i - ev_i[m]  # steps since (s - last, s = i + 1)
            freq = freq_ev[ev_off + m]
            nxt = m + 1
            has = nxt < m_ev
            nxt_c = np.minimum(nxt, m_ev - 1)
            label = has & (ev_e[nxt_c] == e) & (ev_i[nxt_c] <= i + H)
            ys.append(label.astype(float))
            for name in features:
                if name == "recency":
                    v = _log1p_ints(since)
                elif name == "frequency":
                    v = _log1p_ints(freq)
                elif name == "decayed":
                    v = np.fromiter(map(math.log1p, (dec[ev_off + m] * gpow[since]).tolist()), float, len(pos))
                else:
                    v = freq / uses[i]
                cols[name].append(v)
        ev_off += m_ev
    if not ys:
        return np.zeros((0, len(features))), np.zeros(0)
    X = np.column_stack([np.concatenate(cols[name]) for name in features])
    return X, np.concatenate(ys)


def _eligible(n: int, ev_e: np.ndarray, ev_i: np.ndarray, first: np.ndarray, E: int, H: int) -> np.ndarray:
    """[n, E] the layer's samples: an expert seen by step i and not used at it, its horizon in the trace."""
    used = np.zeros((n, E), bool)
    used[ev_i, ev_e] = True
    ok = (np.arange(n)[:, None] >= first[None, :]) & ~used
    cut = n - H  # i + H >= n: censored
    if cut < n:
        ok[max(cut, 0):] = False
    return ok


def _log1p_ints(v: np.ndarray) -> np.ndarray:
    """`math.log1p` of non-negative integers, by a table (as the Python loop computes each)."""
    if not len(v):
        return np.zeros(0)
    table = np.array([math.log1p(x) for x in range(int(v.max()) + 1)], dtype=np.float64)
    return table[v]


def _features(names: list[str], since_steps: int, uses: int, decayed: float, share: float) -> list[float]:
    value = {"recency": math.log1p(since_steps), "frequency": math.log1p(uses),
             "decayed": math.log1p(decayed), "share": share}
    return [value[n] for n in names]


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(raw weights [d], bias) of a logistic regression of y on X: standardised features, mean
    log-loss + l2/2 |w|^2 (bias free), L-BFGS from zero (deterministic)."""
    from scipy.optimize import minimize

    mu = X.mean(0)
    sd = X.std(0)
    sd[sd == 0] = 1.0
    Z = np.hstack([(X - mu) / sd, np.ones((len(X), 1))])
    n, d1 = Z.shape
    sign = 2.0 * y - 1.0

    def loss(w):
        m = sign * (Z * w).sum(axis=1)  # margin (elementwise, not BLAS: the same for any thread count)
        val = np.logaddexp(0.0, -m).mean() + 0.5 * l2 * (w[:-1] * w[:-1]).sum()
        p = np.exp(-np.logaddexp(0.0, m))  # sigmoid(-m)
        grad = -(Z * (sign * p)[:, None]).mean(0)
        grad[:-1] += l2 * w[:-1]
        return val, grad

    res = minimize(loss, np.zeros(d1), jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    w_std, b_std = res.x[:-1], float(res.x[-1])
    w = w_std / sd
    return w, b_std - float((w * mu).sum())


@CACHE.register("learned_score")
class LearnedScore(CachePolicy):
    @dataclass
    class Knobs:
        fit: str = ""  # profile trace folder (FIT_DIR) to fit on; never the replayed trace
        scope: str = "layer"  # "layer" (per-layer partitions) or "global"
        sizes: list[int] | None = field(default=None)  # per-layer slots (scope=layer); default uniform
        horizon_steps: int = 0  # label: used again within this many steps of its layer (0: C // L, >= 1)
        half_life_steps: float = 8.0  # half-life of the decayed frequency, in steps of the layer
        l2: float = 1e-3  # L2 penalty on the standardised weights
        features: str = "recency,frequency,decayed"  # comma-separated subset of recency,frequency,decayed,share
        max_samples: int = 200000  # the fit keeps at most this many samples (a seeded subsample; 0: all)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        sizes = layer_partitions(knobs, ctx)
        if not knobs.half_life_steps > 0:
            raise UserError(f"cache.half_life_steps must be > 0, got {knobs.half_life_steps}")
        names = parse_features(knobs.features)
        L, E = ctx.layers, ctx.experts
        self.E = E
        self.per_layer = sizes is not None
        if self.per_layer:
            self.sizes = sizes
        self.horizon_steps = int(knobs.horizon_steps) or max(1, ctx.capacity_slots // L)
        fit = fit_trace(knobs.fit, ctx, "cache.fit")
        X, y = fit_samples(fit.experts[fit.is_decode].astype(np.int64), E, self.horizon_steps,
                           float(knobs.half_life_steps), names, int(knobs.max_samples))
        if len(y) == 0 or y.min() == y.max():
            raise UserError(f"cache.fit={knobs.fit}: the profile gives {len(y)} sample(s) "
                            f"{'of one label only ' if len(y) else ''}for cache.horizon_steps={self.horizon_steps}; "
                            f"use a longer profile trace or another horizon")
        w, b = fit_logistic(X, y, float(knobs.l2))
        self.weights_ = {n: float(v) for n, v in zip(names, w, strict=True)}
        self.bias_ = b
        self.fit_samples_ = int(len(y))
        self.fit_positive_share_ = float(y.mean())
        self.features = names
        # hot-path constants: one weight per feature (0 when not used)
        self._w_rec, self._w_freq, self._w_dec, self._w_share = (self.weights_.get(n, 0.0) for n in FEATURES)
        self._g = 0.5 ** (1.0 / float(knobs.half_life_steps))
        n = L * E
        self.step = [0] * L  # per layer: steps (distinct t) at which it ran
        self.step_t = [None] * L  # per layer: the t of its latest step
        self.layer_uses = [0] * L
        self.last = [0] * n  # step of the last use (or insertion), on its layer's clock
        self.freq = [0] * n
        self.dec = [0.0] * n  # decayed uses as of step `dlast`
        self.dlast = [0] * n
        self.clock = [0] * n  # global access clock, for the LRU tie-break
        self._tick = 0
        self.members: list[set[int]] = [set() for _ in range(L if self.per_layer else 1)]
        if not self.per_layer:  # scope=global: each member's score kept until its features change
            self.layer_members: list[set[int]] = [set() for _ in range(L)]
            self.member = np.zeros(n, bool)
            self.maybe_loading: set[int] = set()  # members whose load may not have ended (pruned at a miss)
            self.cached = np.zeros(n)  # [L * E] each member's score as of its layer's `cached_at`
            self.cached_at: list[tuple | None] = [None] * L  # (the layer's step number, its uses) then
            self.changed: set[int] = set()  # members whose features moved since their score was kept
            self.on_access = self._on_access_global
            self.on_insert = self._on_insert_global
            self.on_evict = self._on_evict_global

    # ------------------------------------------------------------------------------ bookkeeping

    def _now(self, layer: int, t: int, running: int) -> int:
        """The step number that layer `layer`'s features are measured at, when step (t, `running`)
        asks: its latest step, or for the running layer not yet told of an access at t, the one
        running (its candidates are not used at it: they are not active), as in the fit."""
        step = self.step[layer]
        return step + 1 if layer == running and self.step_t[layer] != t else step

    def on_access(self, key: int, t: int) -> None:
        layer = key // self.E
        if self.step_t[layer] != t:
            self.step_t[layer] = t
            self.step[layer] += 1
        s = self.step[layer]
        self.dec[key] = self.dec[key] * self._g ** (s - self.dlast[key]) + 1.0
        self.dlast[key] = self.last[key] = s
        self.freq[key] += 1
        self.layer_uses[layer] += 1
        self._tick += 1
        self.clock[key] = self._tick

    def on_insert(self, key: int, t: int) -> None:
        layer = key // self.E
        self.members[layer if self.per_layer else 0].add(key)
        self.last[key] = self.step[layer]
        self._tick += 1
        self.clock[key] = self._tick

    def on_evict(self, key: int) -> None:
        self.members[key // self.E if self.per_layer else 0].discard(key)

    # (scope=global: the same, and the kept scores told what changed)
    def _on_access_global(self, key: int, t: int) -> None:
        LearnedScore.on_access(self, key, t)
        self.changed.add(key)

    def _on_insert_global(self, key: int, t: int) -> None:
        LearnedScore.on_insert(self, key, t)
        self.layer_members[key // self.E].add(key)
        self.member[key] = True
        self.maybe_loading.add(key)
        self.changed.add(key)

    def _on_evict_global(self, key: int) -> None:
        LearnedScore.on_evict(self, key)
        self.layer_members[key // self.E].discard(key)
        self.member[key] = False
        self.maybe_loading.discard(key)

    def score(self, key: int, t: int, running: int) -> float:
        """The fitted log-odds that `key` is used again within the horizon, asked at step (t, `running`)."""
        layer = key // self.E
        now = self._now(layer, t, running)
        v = self._w_rec * math.log1p(now - self.last[key]) + self._w_freq * math.log1p(self.freq[key])
        if self._w_dec:
            v += self._w_dec * math.log1p(self.dec[key] * self._g ** (now - self.dlast[key]))
        if self._w_share:
            v += self._w_share * self.freq[key] / max(self.layer_uses[layer], 1)
        return v + self.bias_

    # --------------------------------------------------------------------------------- victims

    def _global_scores(self, t: int, running: int) -> np.ndarray:
        """[L * E] every member's `score` asked at step (t, `running`), kept between misses: a
        layer's members are scored again when its step number (or, with `share`, its uses) moved,
        a member when its own features did; the same Python arithmetic as `score`, so the same values."""
        cached, at, score = self.cached, self.cached_at, self.score
        share = bool(self._w_share)
        changed, step, step_t, uses = self.changed, self.step, self.step_t, self.layer_uses
        for layer, members in enumerate(self.layer_members):  # (every layer: its mark is its members')
            now = step[layer] + 1 if layer == running and step_t[layer] != t else step[layer]  # `_now`
            mark = (now, uses[layer] if share else 0)
            if at[layer] != mark:
                at[layer] = mark
                for k in members:
                    cached[k] = score(k, t, running)
                    changed.discard(k)
        for k in changed:
            if self.member[k]:
                cached[k] = score(k, t, running)
        changed.clear()
        return cached

    def _global_victims(self, need: float, t: int, running: int) -> list[int] | None:
        """The evictable members (resident, not pinned) by (score, access clock, key), lowest
        first, until `need` bytes are freed (None if they cannot be): an argmin over a numpy mask
        of the members; the whole order (a sort) only when the first victim is not enough."""
        cache, clock = self.ctx.cache, self.clock
        idx = evictable_members(cache, self.member, self.maybe_loading)  # ascending keys
        if not len(idx):
            return None
        scores = self._global_scores(t, running)
        sc = scores[idx]
        tied = idx[sc == sc.min()]
        first = int(tied[0]) if len(tied) == 1 else min(tied.tolist(), key=lambda k: (clock[k], k))
        if need - cache.size_bytes[first] <= 0:
            return [first]
        out: list[int] = []
        for _, _, k in sorted((float(scores[k]), clock[k], k) for k in idx.tolist()):  # (its first is `first`)
            out.append(k)
            need -= cache.size_bytes[k]
            if need <= 0:
                return out
        return None

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        if self.per_layer:
            own = key // self.E
            if cache.per_layer[own] < self.sizes[own] and cache.capacity_bytes - cache.used_bytes >= nbytes:
                return []
            state, pinned, clock, score = cache.state, cache.pinned, self.clock, self.score
            best = None
            for k in self.members[own]:
                if state[k] == RESIDENT and k not in pinned:
                    entry = (score(k, t, layer), clock[k], k)
                    if best is None or entry < best:
                        best = entry
            return None if best is None else [best[2]]
        need = nbytes - cache.free_bytes()
        if need <= 0:
            return []
        return self._global_victims(need, t, layer)
