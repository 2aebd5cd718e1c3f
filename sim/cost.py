"""Cost model: how long compute and copies take on a hardware profile for a model preset.

Batch-1 decode is memory-bound: a kernel's time is its fixed launch overhead plus the larger of
(bytes read / memory bandwidth) and (FLOPs / matmul throughput), a roofline per op:

    attention layer (decode):  n_attn_kernels * overhead
                               + max((non-expert bytes + KV bytes read) / bw, FLOPs / flops)
    expert on n tokens:        n_expert_kernels * overhead + max(expert_bytes / bw, 2 * params * n / flops)
    transfer:                  link.latency_s + bytes / link.bandwidth_Bps

Where copies share the device's memory bandwidth (unified memory), each copy in flight on such a
link takes `link.bandwidth_Bps` of it for the duration of a compute op that starts meanwhile
(floored at 10% of the bandwidth). All times in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.models import ModelPreset

N_ATTN_KERNELS = 8  # norm, qkv, rope, attention, out-proj, norm, router, residual
N_EXPERT_KERNELS = 4  # gate, up, act*mul, down


@dataclass(frozen=True)
class Roofline:
    memory_bandwidth_Bps: float
    matmul_flops: float
    kernel_overhead_s: float

    def op_s(self, nbytes: float, flops: float, kernels: int, bw_taken_Bps: float = 0.0) -> float:
        bw = max(self.memory_bandwidth_Bps - bw_taken_Bps, 0.1 * self.memory_bandwidth_Bps)
        return kernels * self.kernel_overhead_s + max(nbytes / bw, flops / self.matmul_flops)


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
        n_max = max(link.channels for link in hw.links.values()) + 1
        #: [n copies in flight on a shared link] -> one expert on one token
        self.expert_s_contended = [self.expert_compute_s(1, bw_taken_Bps=n * self.link_bandwidth_Bps)
                                   for n in range(n_max)]
        self._attn: dict[tuple[int, int], float] = {}

    def attention_decode_s(self, context_tokens: int, copies_in_flight: int = 0) -> float:
        """Memoised `attention_s` for one new token (the decode hot path)."""
        key = (context_tokens, copies_in_flight)
        v = self._attn.get(key)
        if v is None:
            v = self._attn[key] = self.attention_s(context_tokens, 1,
                                                   copies_in_flight * self.link_bandwidth_Bps)
        return v

    def attention_s(self, context_tokens: int, new_tokens: int = 1, bw_taken_Bps: float = 0.0) -> float:
        """One layer's non-expert work for `new_tokens` tokens with `context_tokens` in the KV cache."""
        p = self.preset
        nbytes = p.non_expert_bytes_per_layer + self.kv_bytes_per_token * (context_tokens + new_tokens)
        flops = p.non_expert_flops_per_token_per_layer * new_tokens + 4.0 * p.heads * p.head_dim * new_tokens * (
            context_tokens + new_tokens
        )
        return self.device.op_s(nbytes, flops, N_ATTN_KERNELS, bw_taken_Bps)

    def expert_compute_s(self, tokens: int, on_cpu: bool = False, bw_taken_Bps: float = 0.0) -> float:
        """One routed expert applied to `tokens` tokens, on the device or the CPU."""
        roof = self.cpu if on_cpu else self.device
        return roof.op_s(self.expert_bytes, self.preset.expert_flops_per_token * tokens, N_EXPERT_KERNELS, bw_taken_Bps)

    def load_s(self, nbytes: float) -> float:
        return self.link_latency_s + nbytes / self.link_bandwidth_Bps
