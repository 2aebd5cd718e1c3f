"""`pregate`: prefetch the experts that layer l+d's router picks from layer l's MoE input.

AdapMoE / mixtral-offloading's speculative loading (reference section 2). After layer l gates,
for each depth d = 1..`depth` (target layer l+d), take the predicted experts of layer l+d in rank
order and prefetch the first `count` that are neither resident nor loading. Decode tokens only
(the engine does not call prefetch during prefill). Tie-break: rank order of the pre-gating
logits (stable argsort: lower id first on equal logits).

Predictions come from the trace's `pregate_d` logits (`predictor=trace`), or, for traces without
them (an imported log), from a modelled predictor (`predictor=modelled`): at each rank it names
the true expert of layer l+d with probability a_{l+d}, else a uniformly random wrong expert;
seeded by the run's seed. `predictor=auto` (the default) uses the trace when it can. The
accuracies a_l (`accuracy`):
- `auto` (the default): the published per-layer accuracies of the model when shipped for its
  layers (`policies/data/adapmoe-<model>.yaml`: AdapMoE's measured Mixtral-8x7B ones), else the named
  fallback `FALLBACK_ACCURACY`: one accuracy for every layer, the mean of AdapMoE's measured
  Mixtral-8x7B accuracies over its layers 1-31 (0.866), an assumption about another model;
- `published`: the published accuracies, a UserError for a model without them;
- a number in [0, 1]: that accuracy at every layer.
A modelled predictor is flagged in the summary (`prefetch_modelled`), and what it assumed is
written beside it (`prefetch_modelled_assumption`: which accuracies, from where). To use a model's
real pre-gating, trace it (`python -m sim trace ... pregate_depth=1`): the trace's `pregate_1`.

AdapMoE's runtime behaviour, as options: `wait=true` makes layer l+d wait for its in-flight
prefetches even if unused; `admit=on_use` loads prefetches into a staging buffer and lets a right
one enter the layer's cache only when used (a wrong one is dropped), where `admit=cache` gives a
prefetch a cache slot at once (evicting the layer's LRU expert).

Ours, as an option: `yield_to_demand=true` issues a prefetch in `chunks` pieces that yield the
link to demand loads: when a demand load finds every channel busy, the engine cuts the in-flight
prefetch that frees a channel soonest at its next chunk boundary (never one the current layer
needs). A wrong prediction then costs at most one chunk of link time instead of a whole expert.
`idle_only=true` issues a prefetch only when a channel is idle (a prefetch never queues).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.published import has_published, published
from policies.registry import PREFETCH
from sim.engine.cache import ABSENT
from sim.errors import UserError

#: the modelled predictor's accuracy at every layer for a model without published accuracies
#: (`accuracy=auto`): the mean of AdapMoE's measured Mixtral-8x7B pre-gating accuracies over its
#: layers 1-31 (`policies/data/adapmoe-mixtral-8x7b.yaml`; layer 0 has no predictor), rounded
FALLBACK_ACCURACY = 0.866
FALLBACK_SOURCE = "mixtral-8x7b"


def modelled_predictions(true_ids: np.ndarray, acc: np.ndarray, E: int, d: int,
                         rng: np.random.Generator) -> np.ndarray:
    """[T, L, k] predicted ids for layer l+d made at layer l (row l holds layer l+d's prediction)."""
    T, L, k = true_ids.shape
    pred = np.zeros((T, L, k), dtype=np.int64)
    target = np.zeros_like(pred)
    target[:, : L - d] = true_ids[:, d:]
    right = rng.random((T, L, k)) < np.concatenate([acc[d:], np.zeros(d)])[None, :, None]
    for t in range(T):
        for layer in range(L - d):
            row = target[t, layer]
            wrong_pool = [e for e in range(E) if e not in row]
            for r in range(k):
                if right[t, layer, r] or not wrong_pool:
                    pred[t, layer, r] = row[r]
                else:
                    pred[t, layer, r] = wrong_pool[int(rng.integers(len(wrong_pool)))]
    return pred


@PREFETCH.register("pregate")
class Pregate(PrefetchPolicy):
    @dataclass
    class Knobs:
        depth: int = 1  # how many layers ahead (needs pregate_1..depth in the trace, or a model)
        count: int = 1  # experts prefetched per target layer
        wait: bool = False  # the target layer waits for in-flight prefetches, used or not (AdapMoE)
        admit: str = "cache"  # cache | on_use (AdapMoE: staging buffer, enters the cache when used)
        predictor: str = "auto"  # auto | trace | modelled
        accuracy: str = "auto"  # modelled predictor: auto (published, else FALLBACK_ACCURACY) | published | a number in [0, 1]
        yield_to_demand: bool = False  # (ours) a demand load cuts an in-flight prefetch at a chunk boundary
        chunks: int = 3  # chunks per expert when yielding (3: one per matrix)
        idle_only: bool = False  # (ours) issue a prefetch only onto an idle channel, never queue one

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 1 or knobs.count < 1:
            raise UserError("prefetch.depth and prefetch.count must be >= 1")
        if knobs.admit not in ("cache", "on_use") or knobs.predictor not in ("auto", "trace", "modelled"):
            raise UserError("prefetch.admit must be cache|on_use and prefetch.predictor auto|trace|modelled")
        tr = ctx.trace
        k, E, L = ctx.top_k, ctx.experts, ctx.layers
        missing = [d for d in range(1, knobs.depth + 1) if d not in tr.pregate]
        use_model = knobs.predictor == "modelled" or (knobs.predictor == "auto" and missing)
        if knobs.predictor == "trace" and missing:
            raise UserError(
                f"prefetch 'pregate' with depth={knobs.depth} needs trace columns "
                f"{', '.join(f'pregate_{d}' for d in missing)}, which this trace lacks; "
                f"use prefetch.predictor=modelled or prefetch.depth={min(tr.pregate or [1])}")
        self._accuracy_spec(knobs.accuracy)  # refused even where the trace's own predictions are used
        self.modelled = bool(use_model)
        self.modelled_assumption = ""  # what a modelled predictor assumed (the summary's prefetch_modelled_assumption)
        self.wait_for_prefetch = knobs.wait
        self.admit_on_use = knobs.admit == "on_use"
        self.idle_only = knobs.idle_only
        if knobs.chunks < 1:
            raise UserError("prefetch.chunks must be >= 1")
        self.yield_chunk_bytes = ctx.preset.expert_bytes / knobs.chunks if knobs.yield_to_demand else 0.0
        self.pred: dict[int, np.ndarray] = {}  # depth -> [T, L, k] keys of layer l + d predicted at l
        if use_model:
            acc, self.modelled_assumption = self._accuracy(knobs.accuracy, ctx)
            rng = np.random.default_rng(ctx.rng.integers(2**63))
        for d in range(1, knobs.depth + 1):
            if use_model:
                ids = modelled_predictions(tr.experts.astype(np.int64), acc, E, d, rng)
            else:
                ids = np.argsort(-tr.pregate[d], axis=-1, kind="stable")[..., :k]  # [T, L, k]
            self.pred[d] = (ids + (np.arange(L)[None, :, None] + d) * E).astype(np.int32)  # key in layer l + d
        self._layers = L
        self._by_t: dict[int, dict] = {}  # token -> its predictions as lists, kept while its step (or batch) runs

    def _predictions(self, t: int) -> dict[int, list[list[int]]]:
        """Token t's predicted keys per depth and layer, as lists (fast scalar access), kept while
        its step (or batch) runs."""
        rows = self._by_t.get(t)
        if rows is None:
            if len(self._by_t) >= 4096:  # more than a step holds (batch.max_tokens)
                self._by_t.clear()
            rows = self._by_t[t] = {d: pred[t].tolist() for d, pred in self.pred.items()}
        return rows

    @staticmethod
    def _accuracy_spec(spec: str) -> None:
        if spec in ("auto", "published"):
            return
        try:
            value = float(spec)
        except ValueError:
            raise UserError(f"prefetch.accuracy must be auto, published or a number in [0, 1], got {spec!r}") from None
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise UserError(f"prefetch.accuracy must be auto, published or a number in [0, 1], got {spec!r}")

    @staticmethod
    def _accuracy(spec: str, ctx: Context) -> tuple[np.ndarray, str]:
        """(per-layer accuracies [L], what they are: the summary's prefetch_modelled_assumption)."""
        name = ctx.preset.name
        shipped = None
        if spec == "published" or (spec == "auto" and has_published("adapmoe", name)):
            shipped = np.asarray(published("adapmoe", name)["prefetch_accuracy"], dtype=float)
        if spec == "published" or (shipped is not None and shipped.shape == (ctx.layers,)):
            acc = shipped
            told = (f"prefetch.accuracy={spec}: the published per-layer pre-gating accuracy of {name} "
                    f"(policies/data/adapmoe-{name}.yaml)")
        elif spec == "auto":
            why = (f"the published accuracies of {name!r} have {shipped.size} layers, this model {ctx.layers}"
                   if shipped is not None else f"no published pre-gating accuracy for model {name!r}")
            acc = np.full(ctx.layers, FALLBACK_ACCURACY)
            told = (f"prefetch.accuracy=auto: {why}, so {FALLBACK_ACCURACY} at every layer (FALLBACK_ACCURACY: "
                    f"the mean of AdapMoE's measured {FALLBACK_SOURCE} accuracies); give prefetch.accuracy=A, "
                    f"or a trace with pregate_1")
        else:
            try:
                acc = np.full(ctx.layers, float(spec))
            except ValueError:
                raise UserError(f"prefetch.accuracy must be auto, published or a number, got {spec!r}") from None
            told = f"prefetch.accuracy={spec}: that accuracy at every layer (given)"
        if acc.shape != (ctx.layers,) or np.any((acc < 0) | (acc > 1)):
            raise UserError(f"prefetch.accuracy must give {ctx.layers} values in [0, 1], one per layer of "
                            f"{name} (got {acc.size}): give prefetch.accuracy=A")
        return acc, told

    def on_batch(self, rows: list[int], layer: int) -> list[int]:
        """`PrefetchPolicy.on_batch` (each row's `on_layer`, each key once, in the order first
        named), in one loop: a serving step asks this at every layer, so `on_layer`'s loop is
        written out here rather than called per row (`tests/test_serving.py` checks they agree)."""
        if len(rows) == 1:
            return self.on_layer(rows[0], layer)
        out: list[int] = []
        named: set[int] = set()
        state, count, by_t, layers = self.ctx.cache.state, self.knobs.count, self._by_t, self._layers
        depths = [d for d in self.pred if layer + d < layers]  # 1, 2, ... in order
        for t in rows:
            preds = by_t.get(t)
            if preds is None:
                preds = self._predictions(t)
            for d in depths:
                n = 0
                for key in preds[d][layer]:
                    if state[key] == ABSENT:
                        if key not in named:
                            named.add(key)
                            out.append(key)
                        n += 1
                        if n == count:
                            break
        return out

    def on_layer(self, t: int, layer: int) -> list[int]:
        # on the simulator's hot path: `first_absent`, inline
        out: list[int] = []
        state, count = self.ctx.cache.state, self.knobs.count
        rows = self._by_t.get(t)
        if rows is None:
            rows = self._predictions(t)
        for d, pred in rows.items():  # depths 1, 2, ... in order
            if layer + d >= self._layers:
                break
            n = 0
            for key in pred[layer]:
                if state[key] == ABSENT:
                    out.append(key)
                    n += 1
                    if n == count:
                        break
        return out
