"""Hand-made tiered hardware for the tests (`tests/test_tiers.py`): experts on storage behind a host cache."""

from __future__ import annotations

from sim.machine.hardware import Compute, HardwareProfile, LinkSpec


def tiered_hw(read_Bps: float = 1e9, copy_Bps: float = 4e9, read_latency_s: float = 0.0, copy_latency_s: float = 0.0,
              read_channels: int = 1, copy_channels: int = 1, mem_bw: float = 1e11, host_bytes: float = 1e12,
              reserve_bytes: float | None = 0.0, direct_Bps: float | None = None) -> HardwareProfile:
    """Storage -> host -> device, and the two hops as one `storage_to_device` link (the run with the
    host cache off): by default at the slower hop's bandwidth and the sum of the latencies."""
    dev = Compute(memory_bandwidth_Bps=mem_bw, matmul_flops=1e30, kernel_overhead_s=0.0)
    links = {
        "storage_to_host": LinkSpec("storage_to_host", read_Bps, read_latency_s, read_channels, False),
        "host_to_device": LinkSpec("host_to_device", copy_Bps, copy_latency_s, copy_channels, False),
        "storage_to_device": LinkSpec("storage_to_device", direct_Bps or min(read_Bps, copy_Bps),
                                      read_latency_s + copy_latency_s, min(read_channels, copy_channels), False),
    }
    return HardwareProfile(name="tiered-test", description="hand-made", device=dev, cpu=Compute(1e10, 1e30, 0.0),
                           device_memory_bytes=1e12, host_memory_bytes=host_bytes, unified_memory=False,
                           expert_tier="storage", links=links, memory_reserve_bytes=0.0, expert_cache_bytes=None,
                           sources={}, host_memory_reserve_bytes=reserve_bytes)
