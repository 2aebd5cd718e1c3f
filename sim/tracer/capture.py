"""Forward hooks on every MoE block and router of a loaded model.

A `Capture` is idle until entered (`with Capture(...) as cap:`); inside, every model forward:

- block pre-hook: keeps the MoE input (after the post-attention norm) of layer l in
  `inputs[l]` [B, S, H], detached;
- router hook (while `record`): keeps the router's own output in `routes[l]` as
  `(logits [B, S, E] f32, weights [B, S, k] f32, ids [B, S, k] i64)`, ids re-sorted by weight,
  descending (stable), so that rank 0 is the largest weight;
- router hook (for layers in `drops`): moves the weight of one chosen expert onto another at
  chosen flat rows (`B*S` order) and returns the edited routing to the block, which then really
  computes the changed output (used by `fisher-check`);
- block hook (while `taps`): adds a zero tensor that requires grad to the block output, kept in
  `taps[l]`: the gradient of the loss w.r.t. it is the gradient w.r.t. the MoE block output.

Leaving the `with` removes every hook. Recorded tensors are overwritten by the next forward.
"""

from __future__ import annotations

from typing import Any

import torch

from sim.tracer.families import Family, MoELayer


class Capture:
    def __init__(self, family: Family, layers: list[MoELayer], *, record: bool = False, taps: bool = False):
        self.family = family
        self.layers = layers
        self.record = record
        self.taps_on = taps
        self.inputs: dict[int, torch.Tensor] = {}
        self.routes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.taps: dict[int, torch.Tensor] = {}
        #: layer -> list of (flat row, expert to drop, expert that receives its weight)
        self.drops: dict[int, list[tuple[int, int, int]]] = {}
        self._handles: list[Any] = []
        self._shape: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> Capture:
        for layer in self.layers:
            i = layer.index
            self._handles.append(layer.block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(layer.router.register_forward_hook(self._router(i)))
            self._handles.append(layer.block.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _pre(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._shape[i] = (int(x.shape[0]), int(x.shape[1]))  # [B, S]
            self.inputs[i] = x.detach()

        return hook

    def _router(self, i: int):
        def hook(module, args, output):
            logits, weights, ids = output[0], output[1], output[2]
            if self.record:
                B, S = self._shape[i]
                w, order = torch.sort(weights.detach().float(), dim=-1, descending=True, stable=True)
                self.routes[i] = (
                    logits.detach().float().reshape(B, S, -1),
                    w.reshape(B, S, -1),
                    ids.detach().gather(-1, order).long().reshape(B, S, -1),
                )
            if i in self.drops:
                weights = weights.clone()
                for row, drop, keep in self.drops[i]:
                    cd = (ids[row] == drop).nonzero()
                    ck = (ids[row] == keep).nonzero()
                    if len(cd) != 1 or len(ck) != 1:
                        raise RuntimeError(f"layer {i} row {row}: experts {drop}, {keep} not both routed")
                    weights[row, ck[0, 0]] += weights[row, cd[0, 0]]
                    weights[row, cd[0, 0]] = 0
                return (logits, weights, ids, *output[3:])
            return None

        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            if not self.taps_on:
                return None
            out = self.family.block_tensor(output)
            tap = torch.zeros_like(out, requires_grad=True)
            self.taps[i] = tap
            return self.family.with_block_tensor(output, out + tap)

        return hook

    # ------------------------------------------------------------------ pre-gating
    @torch.no_grad()
    def pregate(self, depth: int) -> dict[int, torch.Tensor]:
        """{d: [B, S, L, E]}: router of MoE layer l+d applied to MoE layer l's input; zeros where
        l+d is past the last MoE layer. Uses the inputs of the latest forward."""
        L = len(self.layers)
        record, self.record = self.record, False  # our own router calls are not routing
        try:
            out: dict[int, torch.Tensor] = {}
            for d in range(1, depth + 1):
                rows = []
                for layer in self.layers:
                    x = self.inputs[layer.index]
                    B, S, H = x.shape
                    E = self.family.num_experts(self.layers[min(layer.index + d, L - 1)])
                    if layer.index + d < L:
                        router = self.layers[layer.index + d].router
                        xr = x.reshape(-1, H).contiguous().to(router.weight.device)
                        logits = router(xr)[0].float().reshape(B, S, -1)
                    else:
                        logits = torch.zeros(B, S, E, dtype=torch.float32, device=x.device)
                    rows.append(logits.cpu())
                out[d] = torch.stack(rows, dim=2)
            return out
        finally:
            self.record = record
