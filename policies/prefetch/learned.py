"""`learned`: prefetch with a small predictor trained offline on a profile trace (ProMoE, DuoServe-MoE).

Source: ProMoE (Song et al., 2024/2025: a learned predictor of later layers' experts, run ahead of
the model) and DuoServe-MoE (Zhang et al., 2025: "a lightweight layer-level predictor trained
offline from activation traces", its decode phase). Both train a small network on a model's
recorded activations; here the predictor is one-vs-rest logistic regression over features that a
routing trace has, fitted with numpy (Newton's method, deterministic), one model per target layer
and depth.

The rule. After layer l of decode token t gates, for each depth d = 1..`depth` (target layer
m = l + d < L), the model of (d, m) scores every expert e of layer m with
P(e runs at m | x) = sigmoid(w_e . [x, 1]), where x concatenates (`features=auto`):
- the one-hot of the experts token t runs at layer l (E values; the gating plan's when the gating
  is stateless, else the trace's top-k, as `history` does);
- the one-hot of the experts the previous token of the same sequence ran at layer m (E values;
  prompt or decode, the trace's order; zeros for a sequence's first token in the trace);
- the pre-gating logits `pregate_d[t, l]` (E values) when both the fit trace and the replayed one
  have them, and the router logits `logits[t, l]` likewise (each row centred on its mean, each
  block divided by its standard deviation over the fit rows, the same scale used at replay).
`features=routing` keeps only the two one-hot blocks. The experts of layer m are ranked by score
(ties: lower expert id, a stable sort), those under `min_prob` are dropped, and the first `count`
that are neither resident nor loading are prefetched (`pick.first_absent`), depth 1 first.

The fit (`LearnedPredictor.fit`): rows are the fit trace's decode tokens (`fit_on=decode`) or all
its tokens (`fit_on=all`); targets are the trace's top-k at layer m. Each expert's model minimises
mean log-loss + l2/2 * |w|^2 (the intercept penalised too, so an expert never seen in the fit
keeps a finite one) by Newton's method with step halving, to a step under 1e-9 or 100 iterations.
The fit trace is `fit=FIT_DIR`, read by `policies.fit.fit_trace` (never the replayed trace nor
its whole: a UserError). Every prediction of the replay is computed once in `__init__` ([T, L, E]
per depth, ranked), so the hot path only reads lists. `sim.trace.predictor_eval` reports
precision and recall of the predicted top-`count` on a test trace.

Simplified against the sources: a linear model instead of ProMoE's/DuoServe's small MLPs; the
features are what a trace records (no hidden states); the predictor runs in no time and on no
stream. Engine knobs as `pregate`'s, passed through (`ENGINE_KNOBS`): `wait`, `admit`,
`yield_to_demand`, `chunks`, `idle_only`. Errors (UserError, naming the knob): depth, count or
chunks < 1, min_prob outside [0, 1], l2 <= 0, an unknown features / fit_on / admit, no fit trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.prefetch.pick import first_absent
from policies.registry import PREFETCH
from sim.errors import UserError
from sim.trace.format import Trace

FEATURES = ("auto", "routing")
FIT_ON = ("decode", "all")
NEWTON_ITERS = 100
NEWTON_TOL = 1e-9


@dataclass
class EngineKnobs:
    """The knobs that ask the engine for `pregate`'s runtime behaviour (`policies/prefetch/pregate.py`)."""

    wait: bool = False  # the target layer waits for in-flight prefetches, used or not (AdapMoE)
    admit: str = "cache"  # cache | on_use (a staging buffer; enters the cache when used)
    yield_to_demand: bool = False  # a demand load cuts an in-flight prefetch at a chunk boundary
    chunks: int = 3  # chunks per expert when yielding
    idle_only: bool = False  # issue a prefetch only onto an idle channel, never queue one


ENGINE_KNOBS = tuple(EngineKnobs.__dataclass_fields__)


def apply_engine_knobs(policy: PrefetchPolicy, knobs: EngineKnobs, ctx: Context) -> None:
    """Set the contract fields of `policy` from its engine knobs, as `pregate` does."""
    if knobs.admit not in ("cache", "on_use"):
        raise UserError(f"prefetch.admit must be cache or on_use, got {knobs.admit!r}")
    if knobs.chunks < 1:
        raise UserError(f"prefetch.chunks must be >= 1, got {knobs.chunks}")
    policy.wait_for_prefetch = bool(knobs.wait)
    policy.admit_on_use = knobs.admit == "on_use"
    policy.idle_only = bool(knobs.idle_only)
    policy.yield_chunk_bytes = ctx.preset.expert_bytes / knobs.chunks if knobs.yield_to_demand else 0.0


def previous_rows(trace: Trace) -> np.ndarray:
    """[T] the trace index of the previous token of the same sequence, -1 for a sequence's first."""
    T = trace.num_tokens
    prev = np.arange(T, dtype=np.int64) - 1
    if T:
        prev[0] = -1
        prev[1:][trace.seq[1:] != trace.seq[:-1]] = -1
    return prev


def one_hot(ids: np.ndarray, E: int) -> np.ndarray:
    """ids [N, k] (-1: none) -> [N, E] float64 with a 1 for each id."""
    out = np.zeros((ids.shape[0], E))
    rows, cols = np.nonzero(ids >= 0)
    out[rows, ids[rows, cols]] = 1.0
    return out


def _centred(block: np.ndarray) -> np.ndarray:
    return block - block.mean(axis=1, keepdims=True)


def fit_logistic(X: np.ndarray, Y: np.ndarray, l2: float) -> np.ndarray:
    """One-vs-rest logistic regression: X [n, F], Y [n, E] in {0, 1} -> W [F + 1, E] (intercept
    last), each column minimising mean log-loss + l2/2 |w|^2, by Newton's method with step halving."""
    n, F = X.shape
    E = Y.shape[1]
    Xb = np.hstack([X, np.ones((n, 1))])  # [n, F + 1]
    W = np.zeros((F + 1, E))
    eye = np.eye(F + 1)

    def objective(W_: np.ndarray) -> np.ndarray:  # [E]
        Z = Xb @ W_
        return (np.logaddexp(0.0, Z) - Y * Z).mean(axis=0) + 0.5 * l2 * (W_ ** 2).sum(axis=0)

    J = objective(W)
    for _ in range(NEWTON_ITERS):
        P = 1.0 / (1.0 + np.exp(-(Xb @ W)))  # [n, E]
        G = Xb.T @ (P - Y) / n + l2 * W  # [F + 1, E]
        S = P * (1.0 - P)  # [n, E]
        # [E, F + 1, F + 1]; einsum, not BLAS: these products are small, and a threaded BLAS on a
        # busy machine spends far longer synchronising than computing them
        H = np.einsum("nei,nj->eij", Xb[:, None, :] * S[:, :, None], Xb) / n + l2 * eye
        step = np.linalg.solve(H, G.T[:, :, None])[:, :, 0].T  # [F + 1, E]
        alpha = np.ones(E)
        for _ in range(30):  # halve each column's step until its objective does not rise
            trial = W - step * alpha
            Jt = objective(trial)
            bad = Jt > J + 1e-15
            if not bad.any():
                break
            alpha = np.where(bad, alpha * 0.5, alpha)
        W, J = trial, Jt
        if np.abs(step * alpha).max() < NEWTON_TOL:
            break
    return W


class LearnedPredictor:
    """The per-(depth, target layer) logistic models, fitted on one trace, applied to another."""

    def __init__(self, fit: Trace, depth: int, l2: float, features: str, fit_on: str,
                 replay: Trace | None = None):
        self.L, self.E, self.depth, self.l2 = fit.model.layers, fit.model.experts, depth, l2
        self.features = features
        other = replay if replay is not None else fit
        #: per depth: the continuous blocks the model reads (`features=auto`: those both traces have)
        self.blocks: dict[int, list[str]] = {}
        for d in range(1, depth + 1):
            both = []
            if features == "auto" and d in fit.pregate and d in other.pregate:
                both.append("pregate")
            if features == "auto" and fit.logits is not None and other.logits is not None:
                both.append("logits")
            self.blocks[d] = both
        rows = np.flatnonzero(fit.is_decode) if fit_on == "decode" else np.arange(fit.num_tokens)
        if rows.size == 0:
            raise UserError("prefetch.fit: the fit trace has no decode tokens to fit on; use prefetch.fit_on=all")
        ids = fit.experts.astype(np.int64)
        prev = previous_rows(fit)
        self.scale: dict[tuple[int, int, str], float] = {}  # (d, target layer, block) -> its fit std
        self.W: dict[tuple[int, int], np.ndarray] = {}  # (d, target layer) -> [F + 1, E]
        for d in range(1, depth + 1):
            for m in range(d, self.L):
                X = self._features(fit, ids, prev, rows, d, m, fitting=True)
                Y = one_hot(ids[rows, m], self.E)
                self.W[(d, m)] = fit_logistic(X, Y, l2)

    def _features(self, tr: Trace, ids: np.ndarray, prev: np.ndarray, rows: np.ndarray, d: int, m: int,
                  fitting: bool = False) -> np.ndarray:
        """[len(rows), F]: the features of the prediction for layer m made at layer m - d."""
        E, src = self.E, m - d
        blocks = [one_hot(ids[rows, src], E)]
        before = prev[rows]
        past = np.full((rows.size, ids.shape[2]), -1, dtype=np.int64)
        has = before >= 0
        past[has] = ids[before[has], m]
        blocks.append(one_hot(past, E))
        for name in self.blocks[d]:
            raw = tr.pregate[d][rows, src] if name == "pregate" else tr.logits[rows, src]
            block = _centred(np.asarray(raw, dtype=np.float64))
            if fitting:
                self.scale[(d, m, name)] = max(float(block.std()), 1e-6)
            blocks.append(block / self.scale[(d, m, name)])
        return np.hstack(blocks)

    def probabilities(self, tr: Trace, ids: np.ndarray, d: int) -> np.ndarray:
        """[T, L, E] P(expert e runs at layer l + d), predicted at layer l, for every token of `tr`
        (`ids` [T, L, k] the experts each token runs); rows l >= L - d are 0."""
        T = tr.num_tokens
        out = np.zeros((T, self.L, self.E))
        prev = previous_rows(tr)
        rows = np.arange(T)
        for m in range(d, self.L):
            Xb = np.hstack([self._features(tr, ids, prev, rows, d, m), np.ones((T, 1))])
            out[:, m - d] = 1.0 / (1.0 + np.exp(-(Xb @ self.W[(d, m)])))
        return out


def ranked(prob: np.ndarray) -> np.ndarray:
    """[..., E] probabilities -> [..., E] expert ids, most probable first (ties: lower id)."""
    return np.argsort(-prob, axis=-1, kind="stable")


@PREFETCH.register("learned")
class Learned(PrefetchPolicy):
    @dataclass
    class Knobs(EngineKnobs):
        fit: str = ""  # the profile trace to fit on (FIT_DIR; never the replayed trace)
        depth: int = 1  # layers ahead
        count: int = 1  # experts prefetched per target layer
        min_prob: float = 0.0  # only experts scored at least this (0: the top `count` whatever their score)
        l2: float = 0.01  # L2 strength of the logistic fit (on the mean log-loss)
        features: str = "auto"  # auto (routing + pregate/logits when both traces have them) | routing
        fit_on: str = "decode"  # decode | all (the fit trace's prompt tokens too)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 1:
            raise UserError(f"prefetch.depth must be >= 1, got {knobs.depth}")
        if knobs.count < 1:
            raise UserError(f"prefetch.count must be >= 1, got {knobs.count}")
        if not 0.0 <= knobs.min_prob <= 1.0:
            raise UserError(f"prefetch.min_prob must be in [0, 1], got {knobs.min_prob}")
        if not knobs.l2 > 0.0:
            raise UserError(f"prefetch.l2 must be > 0, got {knobs.l2}")
        if knobs.features not in FEATURES:
            raise UserError(f"prefetch.features must be one of {', '.join(FEATURES)}, got {knobs.features!r}")
        if knobs.fit_on not in FIT_ON:
            raise UserError(f"prefetch.fit_on must be one of {', '.join(FIT_ON)}, got {knobs.fit_on!r}")
        apply_engine_knobs(self, knobs, ctx)
        from policies.fit import fit_trace

        fit = fit_trace(knobs.fit, ctx, "prefetch.fit")
        tr, L, E = ctx.trace, ctx.layers, ctx.experts
        self.model = LearnedPredictor(fit, knobs.depth, knobs.l2, knobs.features, knobs.fit_on, replay=tr)
        plan = ctx.gating_plan
        ids = (plan.ids if plan is not None else tr.experts).astype(np.int64)
        self.keys: dict[int, np.ndarray] = {}  # depth -> [T, L, E] keys of layer l + d, best first
        self.n_ok: dict[int, np.ndarray] = {}  # depth -> [T, L] how many of them reach min_prob
        for d in range(1, knobs.depth + 1):
            prob = self.model.probabilities(tr, ids, d)
            order = ranked(prob)
            self.keys[d] = (order + (np.arange(L)[None, :, None] + d) * E).astype(np.int32)
            self.n_ok[d] = (np.take_along_axis(prob, order, -1) >= knobs.min_prob).sum(-1).astype(np.int32)
        self._layers = L
        self._by_t: dict[int, dict] = {}

    def _predictions(self, t: int) -> dict[int, list[list[int]]]:
        """Token t's ranked keys (those reaching min_prob) per depth and layer, kept while it runs."""
        rows = self._by_t.get(t)
        if rows is None:
            if len(self._by_t) >= 4096:
                self._by_t.clear()
            rows = self._by_t[t] = {d: [k[:n] for k, n in zip(self.keys[d][t].tolist(), self.n_ok[d][t].tolist(),
                                                                strict=True)]
                                    for d in self.keys}
        return rows

    def on_layer(self, t: int, layer: int) -> list[int]:
        out: list[int] = []
        present, count = self.ctx.cache.is_present, self.knobs.count
        for d, per_layer in self._predictions(t).items():  # depths 1, 2, ... in order
            if layer + d >= self._layers:
                break
            out += first_absent(per_layer[layer], present, count)
        return out
