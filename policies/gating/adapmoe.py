"""`adapmoe`: sensitivity-based adaptive gating (AdapMoE, reference section 1), any top-k.

Top-2 (exactly as published): with renormalised top-2 weights (w1, w2), run only the true top-1
expert e1 (weight 1) when `w2 < sqrt(T / S_l)`; else run both with (w1, w2).
Top-k > 2 (our generalisation): drop the lowest-weight experts, one at a time, while
`S_l * (sum of dropped renormalised weights)^2 < T`; the kept experts' weights are renormalised.
This is the same inequality as the top-2 rule (it reduces to it for k = 2). The estimated loss
increase of each decision is the second-order Fisher estimate `dL = 1/2 * S_l * (dropped)^2`.

Knobs:
- `T`: the global budget, in the units of S_l (nats, for the trace's own Fisher sensitivities);
  0 reproduces `topk` exactly. Its meaning depends on the sensitivities' scale: AdapMoE's
  T = 0.005 with its published Mixtral-8x7B S_l runs one expert on 29.9% of the (token, layer)
  pairs of real Mixtral-8x7B routing (paper: 25.8%) and on 17% of the bundled toy trace's, but
  on 99% of these with the toy trace's own S_l. So, for any scale:
- `target_share`: the share of (token, layer) pairs of the trace's decode tokens that should run
  a single expert; T is solved for it on the trace (`solve_T`: the T whose share is nearest,
  between two neighbouring pair costs S_l * (1 - w_1)^2) and written to the summary
  (`gating_T_solved`). Give `T` or `target_share`, not both; with neither, `target_share =
  DEFAULT_TARGET_SHARE` (0.25: about AdapMoE's published share at its T = 0.005, 25.8% on MMLU).
  It needs `min_experts = 1` (a single expert is what it counts). The `adapmoe` policy preset
  sets neither (so its share is 0.25 on any sensitivity scale); `gating.T=0.005` is AdapMoE's own
  value in its published S_l's units (`python -m sim paper` gives it).
- `sensitivity` (`trace`, `published`, or a file; see policies/published.py), `per_token` (use
  the trace's per-token `fisher` instead of the layer mean S_l: a finer, generalised rule),
  `min_experts` (never run fewer; default 1).
Stateless: all decisions are computed at once with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.published import sensitivities
from policies.registry import GATING
from sim.errors import UserError

#: the single-expert share `adapmoe` aims at when neither `T` nor `target_share` is given
DEFAULT_TARGET_SHARE = 0.25


def _suffix(w: np.ndarray) -> np.ndarray:
    """w [T, L, k] as in the trace -> the renormalised weight dropped with the last j experts,
    j = 0..k-1 [T, L, k]: the same operations as `drop_plan`, so the same numbers to the bit."""
    Tn, L, _ = w.shape
    w = w.astype(np.float64)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    return np.concatenate([np.zeros((Tn, L, 1)), np.cumsum(w[..., ::-1], axis=-1)[..., :-1]], axis=-1)


def drop_plan(ids: np.ndarray, w: np.ndarray, S: np.ndarray, T: float, min_experts: int = 1) -> GatingPlan:
    """ids, w [T, L, k] (rank order, w renormalised); S [T, L] or [L] -> the adaptive plan.

    Drops the lowest-ranked experts while S * dropped^2 < T (strict), keeping `min_experts`.
    """
    Tn, L, k = ids.shape
    S = np.broadcast_to(S, (Tn, L)) if S.ndim == 1 else S
    w = w.astype(np.float64)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    # dropped mass if we drop the last j experts, j = 0..k-1: suffix sums [T, L, k]
    suffix = np.concatenate([np.zeros((Tn, L, 1)), np.cumsum(w[..., ::-1], axis=-1)[..., :-1]], axis=-1)
    ok = S[..., None] * suffix**2 < T  # [T, L, k]: dropping j experts is within budget
    ok[..., 0] = True
    # monotone: the dropped mass grows with j, so the allowed j form a prefix
    n_drop = np.minimum(ok.cumprod(axis=-1).sum(-1) - 1, k - min_experts)  # [T, L]
    keep = np.arange(k)[None, None, :] < (k - n_drop)[..., None]  # [T, L, k]
    new_ids = np.where(keep, ids, -1).astype(np.int64)
    kept_w = np.where(keep, w, 0.0)
    new_w = kept_w / kept_w.sum(-1, keepdims=True)
    dropped = np.take_along_axis(suffix, n_drop[..., None], axis=-1)[..., 0]
    return GatingPlan(ids=new_ids, weights=new_w, dL=0.5 * S * dropped**2)


def single_costs(w: np.ndarray, S: np.ndarray) -> np.ndarray:
    """w [T, L, k], S [T, L] or [L] -> [T, L]: S * (1 - w_1)^2, the budget above which a pair runs
    its top-1 expert alone (computed as `drop_plan` compares it: a pair is single iff cost < T)."""
    Tn, L, k = w.shape
    S = np.broadcast_to(S, (Tn, L)) if S.ndim == 1 else S
    return S * _suffix(w)[..., k - 1] ** 2


def solve_T(costs: np.ndarray, target: float) -> tuple[float, float]:
    """(T, the share of `costs` below it) with that share nearest `target` (a tie: the lower T).

    The share `mean(costs < T)` is a step function of T; T is set midway between the two
    neighbouring distinct costs around the step, so that rounding never moves a pair across."""
    c = np.sort(np.asarray(costs, dtype=np.float64).ravel())
    n = c.size
    if n == 0 or target <= 0.0:
        return 0.0, 0.0
    values = np.unique(c)  # the distinct costs; T just above values[i] makes the share below[i] / n
    below = np.searchsorted(c, values, side="right")  # pairs with cost <= values[i]
    shares = np.concatenate([[0.0], below / n])  # shares reachable: none, or every pair <= values[i]
    i = int(np.argmin(np.abs(shares - target)))  # the first (lowest T) of the nearest
    if i == 0:
        return 0.0, 0.0
    hi = values[i] if i < values.size else None  # the next distinct cost above the step
    lo = values[i - 1]
    T = (lo + hi) / 2 if hi is not None else float(np.nextafter(lo, np.inf))
    if not T > lo:  # neighbours too close for a midpoint
        T = float(np.nextafter(lo, np.inf))
    return float(T), float(shares[i])


@GATING.register("adapmoe")
class AdapMoE(GatingPolicy):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        T: float | None = None  # loss budget in S_l's units (0: top-k exactly); or give target_share
        target_share: float | None = None  # solve T for this single-expert share of the trace (default 0.25)
        sensitivity: str = "trace"  # trace | published | FILE
        per_token: bool = False  # use per-token fisher from the trace instead of S_l
        min_experts: int = 1  # never run fewer experts

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.T is not None and knobs.T < 0:
            raise UserError(f"gating.T must be >= 0, got {knobs.T}")
        if knobs.T is not None and knobs.target_share is not None:
            raise UserError(f"give gating.T or gating.target_share, not both (T={knobs.T:g}, "
                            f"target_share={knobs.target_share:g}; a T set by a policy preset is dropped with gating.T=null)")
        if not 1 <= knobs.min_experts <= ctx.top_k:
            raise UserError(f"gating.min_experts must be in 1..{ctx.top_k}")
        if knobs.per_token:
            if ctx.trace.fisher is None:
                raise UserError("gating.per_token=true needs the trace's per-token 'fisher' column")
            self.S = ctx.trace.fisher.astype(np.float64)
        else:
            self.S = sensitivities(knobs.sensitivity, ctx)
        self.solved: dict[str, float] = {}  # summary keys: the T solved for target_share
        if knobs.T is not None:
            self.T = float(knobs.T)
        else:
            target = DEFAULT_TARGET_SHARE if knobs.target_share is None else float(knobs.target_share)
            if knobs.min_experts > 1:
                raise UserError(f"gating.target_share counts pairs that run one expert, which gating.min_experts="
                                f"{knobs.min_experts} forbids: give gating.T")
            tr = ctx.trace
            decode = tr.is_decode if tr.is_decode.any() else np.ones(tr.num_tokens, bool)
            S = self.S[decode] if self.S.ndim == 2 else self.S
            self.T, _ = solve_T(single_costs(tr.weights[decode], S), target)
            self.solved = {"gating_T_solved": self.T}

    def plan(self) -> GatingPlan:
        tr = self.ctx.trace
        return drop_plan(tr.experts.astype(np.int64), tr.weights, self.S, self.T, self.knobs.min_experts)
