"""What a machine is: the operations the step description (`sim/engine/step.py`) asks of it.

A machine executes the parts of a step where time passes. Each operation returns its result, or
a `sim.engine.step.Pending` holding a SimPy event whose value is the result (the event machine's):

    now                          the compute stream's clock (s)
    attention(layer, ctx, n)     a layer's non-expert work for n new tokens at context ctx
    attention_batch(layer, pairs)   the same for a batch of requests' (context, new tokens)
    run_op(work)                 an op on the compute stream (a `sim.machine.cost.OpWork`: a draft model)
    idle_until(t_s)              nothing to run until t_s (serving: the next arrival)
    settle()                     apply the transfers that ended by now (in time order)
                                 (a simulated machine also applies them as its clock passes them, so
                                 what the step reads after any operation is as of now, as SimPy runs
                                 each completion at its time: the event machine is the reference)
    link_full()                  every channel busy (settled first)
    issue(key, nbytes, prio, staging, t, layer) -> Transfer       a load, admitted by the ledger
    cut_a_prefetch(pinned, chunk_bytes)   the one preemption rule (`sim.engine.preempt`)
    arrived(tr, gate_s)          tr has arrived by the layer's gate time: a hit
    wait(tr), wait_ended(tr)     block until tr ends (and, for the second, is applied): the stall
    first_to_arrive(waiting)     the transfer of `waiting` that arrives first
    compute(key, tokens, w)      a resident expert -> its output (None when simulated)
    compute_loaded(tr, tokens, w) -> (output, stall)   an expert whose transfer was issued
    cpu_start(keys, ws, ready_s[, tokens]), cpu_wait() -> (wait, outputs, start, end)   the CPU worker (tokens: a batch's per expert)
                                 (tiered: it waits for the reads of experts not in host memory)
    prefetch_host(key, t, layer) -> bool   (tiered, `prefetch.into=host`) read key into host memory; False: no slot
    combine(outputs)             the MoE block's output from {key: output}
    warm(keys), run(process), finish()   the run around the steps
    token_done() -> end_s        a token's (or prefill's) work is issued: when it ended
    on_evicted(key), on_staging_freed(tr), on_adopted(tr)   memory the ledger gives back or moves

`needs_weights`: the machine computes real outputs (the step then collects them); `holds_memory`:
the ledger tells it of evictions and freed buffers. `SimulatedMachine` holds what the simulator's
two machines share: they compute no outputs and hold no memory, so those hooks do nothing.
"""

from __future__ import annotations

from sim.engine.transfer import Transfer


class SimulatedMachine:
    needs_weights = False  # it computes no outputs
    tiers = None  # a tiered run's `sim.engine.tiers.TierLink` (hops, host cache, reads log), else None
    holds_memory = False  # it keeps no buffers: the ledger need not tell it of evictions

    def warm(self, keys: list[int]) -> None:
        """The warm-start residents are in place at time 0: nothing to copy."""

    def token_done(self) -> float:
        """When the token's work ended: now (its operations took their time as they ran)."""
        return self.now

    def on_evicted(self, key: int) -> None:
        """Nothing to free."""

    def on_staging_freed(self, tr: Transfer) -> None:
        """Nothing to free."""

    def on_adopted(self, tr: Transfer) -> None:
        """Nothing to move."""

    def combine(self, outs) -> None:
        return None
