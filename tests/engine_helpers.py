"""Small hand-made hardware, presets and traces for engine tests."""

from __future__ import annotations

import numpy as np

from sim.config import RunConfig, resolve_sections
from sim.machine.hardware import Compute, HardwareProfile, LinkSpec
from sim.machine.models import ModelPreset
from sim.trace.format import ModelInfo, Trace


def hw(bw_Bps: float = 1e9, latency_s: float = 0.0, channels: int = 1, mem_bw: float = 1e11,
       overhead_s: float = 0.0, shared: bool = False) -> HardwareProfile:
    dev = Compute(memory_bandwidth_Bps=mem_bw, matmul_flops=1e30, kernel_overhead_s=overhead_s)
    link = LinkSpec("host_to_device", bw_Bps, latency_s, channels, shared)
    return HardwareProfile(name="test", description="hand-made", device=dev, cpu=Compute(1e10, 1e30, 0.0),
                           device_memory_bytes=1e12, host_memory_bytes=1e12, unified_memory=shared,
                           expert_tier="host", links={"host_to_device": link}, memory_reserve_bytes=0.0,
                           expert_cache_bytes=None, sources={})


def preset(layers: int, experts: int, top_k: int, hidden: int = 1024, width: int = 4096) -> ModelPreset:
    return ModelPreset(name="test", layers=layers, experts=experts, top_k=top_k, hidden=hidden, expert_width=width,
                       heads=8, kv_heads=8, head_dim=128, vocab=1000)


def trace(ids: list, layers: int, experts: int, weights: list | None = None, pregate: dict | None = None) -> Trace:
    """ids: [T][L][k] expert ids; decode tokens of one sequence."""
    ex = np.asarray(ids, dtype=np.int16)
    T, L, k = ex.shape
    w = np.asarray(weights, dtype=np.float32) if weights is not None else np.full((T, L, k), 1.0 / k, np.float32)
    model = ModelInfo(name="test", layers=layers, experts=experts, top_k=k)
    return Trace(model=model, seq=np.zeros(T, np.int32), pos=np.arange(T, dtype=np.int32),
                 is_decode=np.ones(T, bool), experts=ex, weights=w, pregate=pregate or {})


def config(**sections) -> RunConfig:
    base = RunConfig(policy=sections.pop("policy", "baseline"), model="test")
    user = {k: sections.pop(k) for k in ("gating", "prefetch", "cache", "placement") if k in sections}
    cfg = resolve_sections(base, user)
    for k, v in sections.items():
        setattr(cfg, k, v)
    return cfg


#: the real Mixtral-8x7B HumanEval routing shared with the project (never committed)
HUMANEVAL_LOG = __import__("sim").REPO_ROOT.parent / "shared" / "traces" / "mixtral-8x7b-humaneval" / "routing.jsonl"


def import_humaneval(folder) -> str:
    """The shared HumanEval log imported as a trace into `folder` (a test skips without the log)."""
    import pytest

    if not HUMANEVAL_LOG.is_file():
        pytest.skip("shared Mixtral HumanEval log not present")
    from sim.machine.models import load_preset
    from sim.trace.format import write_trace
    from sim.trace.importer import import_log

    trace, _ = import_log(HUMANEVAL_LOG, "jsonl", load_preset("mixtral-8x7b"))
    write_trace(trace, folder)
    return str(folder)
