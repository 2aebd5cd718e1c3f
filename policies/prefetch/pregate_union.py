"""`pregate_union`: `pregate` that sees the batch: it prefetches the predicted union of a batched
step's tokens, the experts most of its tokens need first, and at most `limit` of them per layer.

Ours (serving, docs/serving.md). With one token per step it is `pregate` (same knobs, same
predictions). For a batched step (`on_batch`), for each depth d, every decode token of the batch
votes for the first `count` experts its prediction ranks for layer l + d (resident or not); the
experts are ranked by votes (ties: the one named first, in the batch's order, wins), and the
first `limit` that are neither resident nor loading are prefetched (`limit=0`: all of them).
`pregate`'s default for a batch names each token's own first absent experts in turn, so an
expert one token needs can be copied before one that eight need, on a link that is busy anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import Context
from policies.prefetch.pregate import Pregate
from policies.registry import PREFETCH
from sim.engine.cache import ABSENT
from sim.errors import UserError


@PREFETCH.register("pregate_union")
class PregateUnion(Pregate):
    @dataclass
    class Knobs(Pregate.Knobs):
        limit: int = 0  # batched step: prefetch at most this many experts per target layer (0: every predicted one)

    def __init__(self, knobs: Knobs, ctx: Context):
        if knobs.limit < 0:
            raise UserError(f"prefetch.limit must be >= 0, got {knobs.limit}")
        super().__init__(knobs, ctx)

    def on_batch(self, rows: list[int], layer: int) -> list[int]:
        if len(rows) == 1:
            return self.on_layer(rows[0], layer)
        state, count, limit = self.ctx.cache.state, self.knobs.count, self.knobs.limit
        out: list[int] = []
        for d in self.pred:  # depths 1, 2, ... in order
            if layer + d >= self._layers:
                break
            votes: dict[int, int] = {}
            for t in rows:
                for key in self._predictions(t)[d][layer][:count]:
                    votes[key] = votes.get(key, 0) + 1
            ranked = sorted(votes, key=votes.__getitem__, reverse=True)  # stable: first named wins a tie
            chosen = [k for k in ranked if state[k] == ABSENT]
            out += chosen[:limit] if limit else chosen
        return out
