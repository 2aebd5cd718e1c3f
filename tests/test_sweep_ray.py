"""`executor=ray` on a real local Ray instance: the same table as the local process pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from polars.testing import assert_frame_equal

from sim.sweep import run_sweep
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tr") / "synth"
    write_trace(random_trace(np.random.default_rng(3), tokens=24, prefill=4, layers=32, locality=0.4,
                             name="mixtral-8x7b"), d)
    return d


def test_ray_table_equals_local_table(local_ray, trace_dir, tmp_path):
    grid = {"trace": str(trace_dir), "hw": ["jetson.yaml", "rtx4090.yaml"],
            "policy": ["mixtral_offloading", "adapmoe", "hobbit"], "cache.slots": [32, 64],
            "gating.T": [0.001, 0.01]}
    local = run_sweep(grid, tmp_path / "local", executor="local", jobs=2, progress=False, report=False)
    remote = run_sweep(grid, tmp_path / "ray", executor="ray", progress=False, report=False)
    assert local.failed == remote.failed == 0 and remote.ran == local.ran
    assert_frame_equal(local.table, remote.table)
    assert_frame_equal(local.layers, remote.layers)
    assert ray.is_initialized()  # a Ray instance the caller started is left running
    again = run_sweep(grid, tmp_path / "ray", executor="ray", progress=False, report=False)
    assert again.ran == 0 and again.skipped == local.points
