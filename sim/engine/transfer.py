"""A copy of one expert over a link, as every driver of the engine sees it (`sim/engine/step.py`).

States: QUEUED (issued, waiting for a channel: `start_s` = -1) -> ACTIVE (on a channel: `start_s`
set; a simulated link also knows `done_s` from then on) -> DONE (`done`: the copy has ended; the
ledger applies it, in completion order, the next time the step settles the link: the expert is
then resident or its staging buffer holds it). A prefetch issued in chunks may be cut
short for a demand load (`cancelled`): it then ends at a chunk boundary, and its data is unusable.
In a tiered run a device copy may follow a storage read (`source`, itself a Transfer on the
storage hop) and is QUEUED until that read lets it start (`sim/engine/tiers.py`).
A staging buffer is held from the transfer's admission until the engine frees it (`holds_staging`),
once, whichever comes first: its expert computed, the prefetch dropped, or the copy cut.

The real run's copy worker (`sim/realrun/link.py`) fills the last four fields (its buffer, the
matrices copied so far, a request to stop at the next chunk, and, on CUDA, an event the copy must
wait for); the simulator leaves them at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEMAND = 0  # priority of a load an active expert is waiting for
PREFETCH = 1  # priority of a load ahead of need (a queued demand load starts first)
KIND = ("demand", "prefetch")
#: times closer than this (relative) are one instant: a load that ends within rounding of the moment
#: a layer gates has arrived, whichever way the rounding of the two sums went
SAME_INSTANT = 1e-12


def arrived_by(tr: Transfer, t_s: float) -> bool:
    """`tr` is on a channel and ends at `t_s` or before (within `SAME_INSTANT`)."""
    return 0.0 <= tr.start_s and tr.done_s <= t_s * (1.0 + SAME_INSTANT)


@dataclass(eq=False, slots=True)
class Transfer:
    key: int  # the expert: layer * experts + expert
    nbytes: float
    priority: int  # DEMAND or PREFETCH
    staging: bool  # into a staging buffer (computed from it, then dropped) or a cache slot
    token: int  # the decode token (or a prompt's first token) whose step issued it
    layer: int  # the layer whose step issued it (a prefetch is for a later layer)
    issued_s: float
    seqno: int  # issue order, from 1; the load's row in the events table
    start_s: float = -1.0
    done_s: float = -1.0
    done: bool = False
    cancelled: bool = False
    holds_staging: bool = False
    # a tiered run (`sim.engine.tiers`): the storage read this copy follows, and the earliest it can end
    source: Any = None
    min_done_s: float = 0.0
    # the real run's copy worker
    buf: int = -1
    progress: int = 0  # matrices fully copied
    cancel_requested: bool = False
    after: Any = None

    @property
    def started(self) -> bool:
        return self.start_s >= 0.0

    @property
    def kind(self) -> str:
        return KIND[self.priority]
