"""`python -m sim calibrate`: a quick calibration writes a profile that loads, every number measured."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from sim.cli import main  # noqa: E402
from sim.machine.hardware import load_profile  # noqa: E402


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "local.yaml"
    rc = main(["calibrate", "quick=true", "repeats=3", f"out={out}", f"store_dir={tmp_path / 'store'}",
               "progress=false"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    hw = load_profile(str(out))
    assert hw.expert_tier == "storage" and {"storage_to_device", "host_to_device"} <= set(hw.links)
    assert hw.sources and all(s.startswith("measured: python -m sim calibrate quick=true") for s in hw.sources.values())
    assert hw.device.memory_bandwidth_Bps > 1e8 and hw.expert_link.bandwidth_Bps > 1e6
    assert hw.device.kernel_overhead_s >= 0 and hw.expert_link.latency_s >= 0
    assert isinstance(hw.expert_link.shares_memory_bandwidth, bool)
    for what in ("storage_to_device bandwidth", "device GEMV bandwidth", "spread"):
        assert what in stdout
    assert not list(tmp_path.glob(".local*"))  # no temporary file left behind


def test_calibrate_host_store_only(tmp_path, capsys):
    out = tmp_path / "host.yaml"
    rc = main(["calibrate", "store=host", "sizes=50000,200000", "repeats=3", f"out={out}", "progress=false",
               "name=hostonly"])
    assert rc == 0, capsys.readouterr().err
    hw = load_profile(str(out))
    assert hw.name == "hostonly" and hw.expert_tier == "host" and set(hw.links) == {"host_to_device"}


@pytest.mark.parametrize("args,needle", [
    (["device=cuda"], "cuda"),
    (["repeats=1"], "repeats must be >= 3"),
    (["sizes=1e5"], "at least two"),
    (["sizes=a,b"], "sizes must be numbers"),
    (["store=tape"], "store must be one of"),
    (["model=mixtral-8x7b"], "bits must be 32 or 16"),
])
def test_calibrate_bad_inputs(tmp_path, capsys, args, needle):
    import torch

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "p.yaml"
    rc = main(["calibrate", *args, f"out={out}", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_machine_probes_pool_into_the_models_sizes_only(tmp_path):
    """A probe times the links, the expert and the CPU worker at the model's expert size and the
    stand-in at its non-expert size; `add_probes` adds those samples to the same points of a
    session (batch means and the copy worker's own times alike) and leaves the other sizes alone."""
    from sim.machine.models import load_preset
    from sim.realrun.backend import Backend
    from sim.realrun.calibrate import CalibrateOptions, add_probes, measure, probe_machine

    opts = CalibrateOptions(store="host", model="toy-mixtral", sizes="50000,200000", repeats=3, progress=False,
                            store_dir=str(tmp_path / "store"))
    backend = Backend("cpu", 1, True)
    m = measure(opts, backend)
    probe = probe_machine(opts, backend)
    expert, layer = m.anchors
    assert set(probe.links) == {"host"}
    assert probe.links["host"].sizes == [expert] and probe.expert.sizes == [expert] and probe.cpu.sizes == [expert]
    assert abs(probe.stand_in.sizes[0] - layer) <= 0.01 * layer
    assert load_preset("toy-mixtral").non_expert_bytes_per_layer == layer
    pooled = add_probes(m, [probe, probe])
    assert pooled.probes == 2
    for name in ("links", "link_copy", "expert", "stand_in", "cpu"):
        before, after, got = (getattr(x, name) for x in (m, pooled, probe))
        if isinstance(before, dict):
            before, after, got = before["host"], after["host"], got["host"]
        for size, runs, old in zip(after.sizes, after.runs, before.runs, strict=True):
            j = got.index(size)
            assert len(runs) - len(old) == (2 * len(got.runs[j]) if j is not None else 0), (name, size)
        assert any(got.index(size) is not None for size in after.sizes), name
    assert m.copy_mean_s("host", expert) > 0


def test_pooled_values_are_the_mean_over_moments_of_each_moments_median():
    """Within a session or probe the median (robust to a disturbed batch); across them the mean,
    since a run's time averages over the machine's slow moments as well as its fast ones."""
    import numpy as np

    from sim.realrun.calibrate import Series

    a, b, c = Series(), Series(), Series()
    a.add(100.0, [1.0, 1.0, 9.0])  # median 1 (one disturbed batch)
    a.add(200.0, [2.0, 2.0, 2.0])
    b.add(100.0, [3.0, 3.0, 3.0])  # a slow moment: median 3
    c.add(200.0, [4.0, 4.0])  # only one of the sizes
    c.add(300.0, [7.0])  # a size the first series lacks: left out
    pooled = a.pooled_with([b, c])
    assert pooled.sizes == [100.0, 200.0]
    assert np.allclose(pooled.values, [(1 + 3) / 2, (2 + 4) / 2])
    assert [len(r) for r in pooled.runs] == [6, 5]
    assert np.allclose(a.values, [1.0, 2.0])  # the originals are left alone
