"""Cost model: how long compute and copies take on a hardware profile for a model preset.

Batch-1 decode is memory-bound: a kernel's time is its fixed launch overhead plus the larger of
(bytes read / memory bandwidth) and (FLOPs / matmul throughput), a roofline per op:

    attention layer (decode):  n_attn_kernels * overhead
                               + max((non-expert bytes + KV bytes read) / bw, FLOPs / flops)
    expert on n tokens:        n_expert_kernels * overhead + max(expert_bytes / bw, 2 * params * n / flops)
    transfer:                  link.latency_s + bytes / link.bandwidth_Bps

Where copies share the device's memory bandwidth (unified memory), a copy takes the link's
bandwidth from compute while its body is in flight, piecewise in time (`sim/machine/contention.py`);
`OpWork.shared_s` gives an op's duration beside the copies around it. All times in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.machine.models import ModelPreset

N_ATTN_KERNELS = 8  # norm, qkv, rope, attention, out-proj, norm, router, residual
N_EXPERT_KERNELS = 4  # gate, up, act*mul, down


@dataclass(frozen=True)
class Roofline:
    memory_bandwidth_Bps: float
    matmul_flops: float
    kernel_overhead_s: float

    def op_s(self, nbytes: float, flops: float, kernels: int) -> float:
        """An op alone on the device: overhead + the larger of its memory and matmul times."""
        return kernels * self.kernel_overhead_s + max(nbytes / self.memory_bandwidth_Bps, flops / self.matmul_flops)

    def work(self, nbytes: float, flops: float, kernels: float) -> OpWork:
        """The parts of an op that memory contention treats differently (`sim/machine/contention.py`)."""
        return OpWork(kernels * self.kernel_overhead_s, nbytes, flops / self.matmul_flops)


@dataclass(frozen=True)
class OpWork:
    """An op as contention sees it: `overhead_s` (no memory traffic), then a body that reads
    `nbytes` and lasts at least `matmul_s`. Alone on the device it takes
    `overhead_s + max(nbytes / memory_bandwidth_Bps, matmul_s)`."""

    overhead_s: float
    nbytes: float
    matmul_s: float

    def shared_s(self, start_s: float, bus) -> float:
        """Its duration from `start_s` beside the copies of a `sim.machine.contention.MemoryBus`."""
        return bus.op_s(self, start_s)


class CostModel:
    """Durations of the engine's operations for one (preset, hardware) pair."""

    def __init__(self, preset: ModelPreset, hw):
        self.preset = preset
        self.hw = hw
        self.device = Roofline(hw.device.memory_bandwidth_Bps, hw.device.matmul_flops, hw.device.kernel_overhead_s)
        self.cpu = Roofline(hw.cpu.memory_bandwidth_Bps, hw.cpu.matmul_flops, hw.cpu.kernel_overhead_s)
        link = hw.expert_link
        self.link_bandwidth_Bps = link.bandwidth_Bps
        self.link_latency_s = link.latency_s
        self.shared_link = bool(link.shares_memory_bandwidth)
        self.expert_bytes = preset.expert_bytes
        self.kv_bytes_per_token = preset.kv_bytes_per_token_per_layer()
        # decode fast path: expert time on one token with no contention
        self.expert_s = self.expert_compute_s(1)
        self._attn: dict[int, float] = {}
        self._attn_work: dict[tuple[int, int], OpWork] = {}
        self._batch_attn: tuple[list, OpWork | None] = ([], None)  # the last batch's (pairs, work)

    def attention_decode_s(self, context_tokens: int) -> float:
        """Memoised `attention_s` for one new token without contention (the decode hot path)."""
        v = self._attn.get(context_tokens)
        if v is None:
            v = self._attn[context_tokens] = self.attention_s(context_tokens, 1)
        return v

    def attention_s(self, context_tokens: int, new_tokens: int = 1) -> float:
        """One layer's non-expert work for `new_tokens` tokens with `context_tokens` in the KV cache."""
        nbytes, flops = self._attention_work(context_tokens, new_tokens)
        return self.device.op_s(nbytes, flops, N_ATTN_KERNELS)

    def _attention_work(self, context_tokens: int, new_tokens: int) -> tuple[float, float]:
        """(bytes read, FLOPs) of one layer's non-expert work: weights and the KV cache."""
        p = self.preset
        nbytes = p.non_expert_bytes_per_layer + self.kv_bytes_per_token * (context_tokens + new_tokens)
        flops = p.non_expert_flops_per_token_per_layer * new_tokens + 4.0 * p.heads * p.head_dim * new_tokens * (
            context_tokens + new_tokens
        )
        return nbytes, flops

    def attention_work(self, context_tokens: int, new_tokens: int = 1) -> OpWork:
        """One layer's non-expert work on the device, as memory contention sees it (memoised)."""
        key = (context_tokens, new_tokens)
        w = self._attn_work.get(key)
        if w is None:
            w = self._attn_work[key] = self.device.work(*self._attention_work(context_tokens, new_tokens), N_ATTN_KERNELS)
        return w

    def batch_attention_work(self, pairs: list[tuple[int, int]]) -> OpWork:
        """One layer's non-expert work for a batch: each request's (context tokens, new tokens).
        The weights are read once for the batch; each request reads its own KV cache. The last
        batch's is kept: every MoE layer of a step asks for the same."""
        last, work = self._batch_attn
        if pairs == last:
            return work
        p = self.preset
        new = sum(n for _, n in pairs)
        nbytes = p.non_expert_bytes_per_layer + self.kv_bytes_per_token * sum(c + n for c, n in pairs)
        flops = p.non_expert_flops_per_token_per_layer * new + sum(
            4.0 * p.heads * p.head_dim * n * (c + n) for c, n in pairs)
        work = self.device.work(nbytes, flops, N_ATTN_KERNELS)
        self._batch_attn = (list(pairs), work)
        return work

    def expert_work(self, tokens: int = 1, fraction: float = 1.0) -> OpWork:
        """One expert (or `fraction` of it: 1/3 is one of its GEMMs) on `tokens` tokens, on the device."""
        return self.device.work(self.expert_bytes * fraction, self.preset.expert_flops_per_token * tokens * fraction,
                                N_EXPERT_KERNELS * fraction)

    def expert_compute_s(self, tokens: int, on_cpu: bool = False) -> float:
        """One routed expert applied to `tokens` tokens, on the device or the CPU, without contention."""
        roof = self.cpu if on_cpu else self.device
        return roof.op_s(self.expert_bytes, self.preset.expert_flops_per_token * tokens, N_EXPERT_KERNELS)

    def cpu_experts_s(self, n_experts: int, tokens: list[int] | None) -> float:
        """The CPU worker's time for `n_experts` experts, each on one token, or on `tokens[i]`."""
        if tokens is None:
            return n_experts * self.expert_compute_s(1, on_cpu=True)
        return sum(self.expert_compute_s(n, on_cpu=True) for n in tokens)

    def load_s(self, nbytes: float) -> float:
        return self.link_latency_s + nbytes / self.link_bandwidth_Bps
