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
only those a cache would hold (simpler; the ranking, not calibration, is what is used). The
model is fitted on standardised features by L-BFGS (`scipy.optimize.minimize`, from zero, with
an analytic gradient: deterministic) on the mean log-loss plus `l2`/2 * |w|^2 (bias
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
or contains it, or of another model shape (`cache.fit`); unknown
`features`; `half_life_steps` <= 0; a profile giving no samples or samples of one label only
(`cache.fit` / `cache.horizon_steps`). Cost: O(candidates) per eviction (a few `log1p` each),
O(1) per access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.partition import check_sizes, uniform_sizes
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
                features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(X [n, len(features)] raw features, y [n] labels) from decode ids [T, L, k] (-1 = not run);
    see the module docstring. Steps of a layer are the rows in which it runs an expert."""
    T, L, _ = ids.shape
    g = 0.5 ** (1.0 / half_life_steps)
    xs: list[list[float]] = []
    ys: list[int] = []
    for layer in range(L):
        rows = [[int(e) for e in ids[t, layer] if e >= 0] for t in range(T)]
        rows = [r for r in rows if r]
        n = len(rows)
        # next_use[i][e]: the first step index > i at which e is used (n if none)
        next_use = [[n] * experts for _ in range(n + 1)]
        for i in range(n - 1, -1, -1):
            nxt = list(next_use[i + 1])
            for e in rows[i]:
                nxt[e] = i
            next_use[i] = nxt
        last = [0] * experts
        freq = [0] * experts
        dec = [0.0] * experts
        dlast = [0] * experts
        layer_uses = 0
        for i, row in enumerate(rows):
            s = i + 1  # step numbers start at 1 (the replay's clock)
            for e in row:
                dec[e] = dec[e] * g ** (s - dlast[e]) + 1.0
                dlast[e] = last[e] = s
                freq[e] += 1
                layer_uses += 1
            if i + horizon_steps >= n:  # horizon past the end: censored
                continue
            for e in range(experts):
                if freq[e] == 0 or e in row:
                    continue
                xs.append(_features(features, s - last[e], freq[e], dec[e] * g ** (s - dlast[e]),
                                    freq[e] / layer_uses))
                ys.append(1 if next_use[i + 1][e] <= i + horizon_steps else 0)
    X = np.asarray(xs, float).reshape(len(xs), len(features))
    return X, np.asarray(ys, float)


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
        m = sign * (Z @ w)  # margin
        val = np.logaddexp(0.0, -m).mean() + 0.5 * l2 * (w[:-1] @ w[:-1])
        p = np.exp(-np.logaddexp(0.0, m))  # sigmoid(-m)
        grad = -(Z * (sign * p)[:, None]).mean(0)
        grad[:-1] += l2 * w[:-1]
        return val, grad

    res = minimize(loss, np.zeros(d1), jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    w_std, b_std = res.x[:-1], float(res.x[-1])
    w = w_std / sd
    return w, b_std - float(w @ mu)


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

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.scope not in ("layer", "global"):
            raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
        if not knobs.half_life_steps > 0:
            raise UserError(f"cache.half_life_steps must be > 0, got {knobs.half_life_steps}")
        names = parse_features(knobs.features)
        L, E = ctx.layers, ctx.experts
        self.E = E
        self.per_layer = knobs.scope == "layer"
        if self.per_layer:
            self.sizes = (check_sizes(knobs.sizes, ctx.capacity_slots, L, E) if knobs.sizes
                          else uniform_sizes(ctx.capacity_slots, L))
        self.horizon_steps = int(knobs.horizon_steps) or max(1, ctx.capacity_slots // L)
        fit = fit_trace(knobs.fit, ctx, "cache.fit")
        X, y = fit_samples(fit.experts[fit.is_decode].astype(np.int64), E, self.horizon_steps,
                           float(knobs.half_life_steps), names)
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

    def _ranked(self, members: set[int], t: int, running: int) -> list[tuple[float, int, int]]:
        state, pinned, clock, score = self.ctx.cache.state, self.ctx.cache.pinned, self.clock, self.score
        return sorted((score(k, t, running), clock[k], k)
                      for k in members if state[k] == RESIDENT and k not in pinned)

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
        out: list[int] = []
        for _, _, k in self._ranked(self.members[0], t, layer):
            out.append(k)
            need -= cache.size_bytes[k]
            if need <= 0:
                return out
        return None
