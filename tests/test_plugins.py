"""Plug-in policies: a `random_evict` cache policy in a file outside the package, used from the
command line (`plugins=FILE.py`, `plugins=MODULE` on PYTHONPATH), from every sweep executor, from
the Python API, and through the entry-point group `moe_offload_sim.policies`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sim import REPO_ROOT
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace

PLUGIN = '''
"""A random-eviction cache policy, written outside the package (a plug-in)."""

from dataclasses import dataclass

from policies.base import CachePolicy
from policies.presets import register_preset
from policies.registry import CACHE


@CACHE.register("{name}")
class RandomEvict(CachePolicy):
    """Evict uniformly random evictable experts (the run's seeded generator)."""

    @dataclass
    class Knobs:
        shuffles: int = 1  # shuffles of the candidates per eviction

    def __init__(self, knobs, ctx):
        super().__init__(knobs, ctx)
        self.resident = set()

    def on_insert(self, key, t):
        self.resident.add(key)

    def on_evict(self, key):
        self.resident.discard(key)

    def victims(self, key, nbytes, t, layer, demand=True):
        cache = self.ctx.cache
        need = nbytes - cache.free_bytes()
        if need <= 0:
            return []
        candidates = [k for k in sorted(self.resident) if cache.evictable(k)]
        for _ in range(self.knobs.shuffles):
            self.ctx.rng.shuffle(candidates)
        out = []
        for k in candidates:
            if need <= 0:
                break
            out.append(k)
            need -= cache.size_bytes[k]
        return out if need <= 0 else None


register_preset("{name}_preset", {{"gating": {{"name": "topk"}}, "prefetch": {{"name": "none"}},
                                   "cache": {{"name": "{name}"}}, "placement": {{"name": "load"}}}})
'''


def write_plugin(folder: Path, module: str, name: str = "random_evict") -> Path:
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent(PLUGIN.format(name=name)))
    return path


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tr") / "synth"
    write_trace(random_trace(np.random.default_rng(1), tokens=16, prefill=4, layers=32, locality=0.4), d)
    return d


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plug")
    write_plugin(d, "random_evict_plugin")
    (d / "broken_plugin.py").write_text("raise RuntimeError('this plug-in is broken')\n")
    (d / "clash_plugin.py").write_text(textwrap.dedent('''
        from policies.base import CachePolicy
        from policies.registry import CACHE

        @CACHE.register("lru")
        class MyLRU(CachePolicy):
            pass
    '''))
    return d


def sim_cli(args: list[str], *, python: str = sys.executable, pythonpath: Path | None = None,
            cwd: Path = REPO_ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([python, "-m", "sim", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_args(trace_dir: Path, out: Path) -> list[str]:
    return ["run", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.slots=48", f"out={out}",
            "report=false"]


# ------------------------------------------------------------------------------ the command line


def test_a_policy_outside_the_package_is_unknown_without_plugins(trace_dir, tmp_path):
    proc = sim_cli([*run_args(trace_dir, tmp_path / "o"), "cache.name=random_evict"])
    assert "unknown cache policy 'random_evict'" in one_line_error(proc) and "plugins=" in proc.stderr


def test_plugin_file_and_module_run_from_the_command_line(trace_dir, plugin_dir, tmp_path):
    by_path = sim_cli([*run_args(trace_dir, tmp_path / "a"), f"plugins={plugin_dir / 'random_evict_plugin.py'}",
                       "cache.name=random_evict", "cache.shuffles=2"])
    assert by_path.returncode == 0, by_path.stderr
    by_module = sim_cli([*run_args(trace_dir, tmp_path / "b"), "plugins=random_evict_plugin",
                         "cache.name=random_evict", "cache.shuffles=2"], pythonpath=plugin_dir)
    assert by_module.returncode == 0, by_module.stderr
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert a == b and 0 < a["hit_rate"] < 1  # the same seeded policy, however it was found
    preset = sim_cli([*run_args(trace_dir, tmp_path / "c"), "plugins=random_evict_plugin",
                      "policy=random_evict_preset"], pythonpath=plugin_dir)
    assert preset.returncode == 0, preset.stderr
    cfg = (tmp_path / "c" / "config.yaml").read_text()
    assert "name: random_evict" in cfg and "plugins: random_evict_plugin" in cfg


def test_plugin_knobs_are_checked_and_listed(trace_dir, plugin_dir, tmp_path):
    bad = sim_cli([*run_args(trace_dir, tmp_path / "o"), "plugins=random_evict_plugin", "cache.name=random_evict",
                   "cache.nope=1"], pythonpath=plugin_dir)
    line = one_line_error(bad)
    assert "cache.shuffles" in line and "cache.slots" in line and "cache.bytes" in line
    listed = sim_cli(["list", "policies", f"plugins={plugin_dir / 'random_evict_plugin.py'}"])
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"random_evict +Evict uniformly random evictable experts", listed.stdout)
    assert "cache.shuffles  int" in listed.stdout


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sweep_workers_import_the_plugin(executor, trace_dir, plugin_dir, tmp_path):
    if executor == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "sw"
    proc = sim_cli(["sweep", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b",
                    "plugins=random_evict_plugin", "cache.name=random_evict,lru", "cache.slots=48,64", f"out={out}", f"executor={executor}",
                    "jobs=2", "progress=false", "report=false"], pythonpath=plugin_dir)
    assert proc.returncode == 0, proc.stderr
    t = pl.read_parquet(out / "sweep.parquet")
    assert t.height == 4 and t["error"].null_count() == 4, t.select("cache.name", "error")
    assert sorted(set(t["cache.name"].to_list())) == ["lru", "random_evict"]


def test_sweep_executors_agree_with_a_plugin_file(trace_dir, plugin_dir, tmp_path):
    """Local processes (spawned workers) and one process give the same numbers for a plug-in file
    named by a relative path."""
    from sim.sweep import run_sweep

    grid = {"trace": str(trace_dir), "hw": "rtx4090.yaml", "model": "mixtral-8x7b", "cache.name": "random_evict",
            "cache.slots": [48, 64], "plugins": "random_evict_plugin.py"}
    cwd = os.getcwd()
    os.chdir(plugin_dir)
    try:
        serial = run_sweep(grid, tmp_path / "one", jobs=1, progress=False, report=False)
        pool = run_sweep(grid, tmp_path / "two", jobs=2, progress=False, report=False)
    finally:
        os.chdir(cwd)
        _forget_plugin("random_evict", "sim_plugin_random_evict_plugin")
    assert serial.failed == 0 and pool.failed == 0, pool.table["error"].to_list()
    assert serial.table.drop("wall_s", strict=False).equals(pool.table.drop("wall_s", strict=False))


@pytest.mark.parametrize("plugin,needle", [
    ("nope_not_a_module", "plug-in 'nope_not_a_module': no module named 'nope_not_a_module'"),
    ("broken_plugin", "plug-in 'broken_plugin' raised on import: RuntimeError: this plug-in is broken"),
    ("clash_plugin", "cache policy 'lru' of clash_plugin is already registered by policies.cache.lru"),
    ("missing/file.py", "plug-in 'missing/file.py': file not found"),
    ("not-a-name", "is not a module name"),
])
def test_a_bad_plugin_is_one_line_naming_it(plugin, needle, trace_dir, plugin_dir, tmp_path):
    proc = sim_cli([*run_args(trace_dir, tmp_path / "o"), f"plugins={plugin}"], pythonpath=plugin_dir)
    assert needle in one_line_error(proc)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- Python API


def _forget_plugin(policy: str, module: str) -> None:
    """Undo a plug-in's registration in this process (the registries are process-wide)."""
    from policies import presets, registry

    registry.CACHE._classes.pop(policy, None)
    presets.PRESETS.pop(f"{policy}_preset", None)
    sys.modules.pop(module, None)
    for item, name in list(registry._plugins_loaded.items()):
        if name == module:
            del registry._plugins_loaded[item]


def test_python_api_takes_plugins(trace_dir, plugin_dir):
    import sim

    try:
        res = sim.run(trace=str(trace_dir), hw="rtx4090.yaml", model="mixtral-8x7b",
                      plugins=str(plugin_dir / "random_evict_plugin.py"), cache={"name": "random_evict", "slots": 48})
    finally:
        _forget_plugin("random_evict", "sim_plugin_random_evict_plugin")
    assert 0 < res.summary["hit_rate"] < 1


# -------------------------------------------------------------------------------- entry points


@pytest.fixture
def fake_entry_point(plugin_dir, monkeypatch):
    """An installed distribution's entry point, faked: `importlib.metadata.entry_points` answers it."""
    import importlib.metadata as md

    from policies import registry

    write_plugin(plugin_dir, "ep_random_plugin", name="ep_random_evict")
    monkeypatch.syspath_prepend(str(plugin_dir))
    ep = md.EntryPoint(name="ep_random", value="ep_random_plugin", group=registry.ENTRY_POINT_GROUP)
    real = md.entry_points

    def entry_points(**kw):
        return [ep, ep] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw)  # twice: deduplicated

    monkeypatch.setattr(md, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield ep
    _forget_plugin("ep_random_evict", "ep_random_plugin")
    registry._entry_points_loaded = True  # the real ones (if any) were loaded before; the fake is gone


def test_entry_point_plugin_is_loaded_once_by_the_registries(fake_entry_point, trace_dir):
    from policies.presets import preset_names
    from policies.registry import CACHE
    from sim.config import parse_run_config
    from sim.runner import simulate

    assert "ep_random_evict" in CACHE.names() and "ep_random_evict_preset" in preset_names()
    cfg = parse_run_config([f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.slots=48",
                            "policy=ep_random_evict_preset"])
    assert cfg.cache["name"] == "ep_random_evict"
    assert 0 < simulate(cfg).summary["hit_rate"] < 1


def test_a_broken_entry_point_is_one_line_naming_it(plugin_dir, monkeypatch):
    import importlib.metadata as md

    from policies import registry
    from sim.errors import UserError

    monkeypatch.syspath_prepend(str(plugin_dir))
    ep = md.EntryPoint(name="broken", value="broken_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(md, "entry_points", lambda **kw: [ep])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.raises(UserError, match=r"plug-in entry point 'broken' \(broken_plugin; group moe_offload_sim"
                                        r".policies\) failed to load: RuntimeError: this plug-in is broken"):
        registry.CACHE.names()
    sys.modules.pop("broken_plugin", None)


# ------------------------------------------------------------- an installed distribution, for real

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "sim-random-evict"
version = "0.1"

[project.entry-points."moe_offload_sim.policies"]
random_evict = "sim_random_evict"

[tool.setuptools]
py-modules = ["sim_random_evict"]
"""


def _venv_with_plugin(tmp: Path) -> Path:
    dist = tmp / "dist"
    dist.mkdir()
    (dist / "pyproject.toml").write_text(PYPROJECT)
    write_plugin(dist, "sim_random_evict")
    venv = tmp / "venv"
    # without its own pip and setuptools: the system's (seen through --system-site-packages) build it offline
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", str(dist)], capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    if proc.returncode != 0:
        pytest.skip(f"cannot install a distribution offline here: {proc.stderr.strip().splitlines()[-1:]}")
    return py


def test_installed_distribution_entry_point(trace_dir, tmp_path):
    """A distribution installed into a venv (no download) declares the policy as an entry point:
    `run` and `sweep` (its spawned workers too) find it with no plugins= at all (15 s here)."""
    t0 = time.perf_counter()
    py = _venv_with_plugin(tmp_path)
    proc = sim_cli([*run_args(trace_dir, tmp_path / "o"), "cache.name=random_evict"], python=str(py))
    assert proc.returncode == 0, proc.stderr
    sweep = sim_cli(["sweep", f"trace={trace_dir}", "hw=rtx4090.yaml", "model=mixtral-8x7b", "cache.name=random_evict,lru",
                     "cache.slots=48", f"out={tmp_path / 'sw'}", "jobs=2", "progress=false", "report=false"],
                    python=str(py))
    assert sweep.returncode == 0, sweep.stderr
    t = pl.read_parquet(tmp_path / "sw" / "sweep.parquet")
    assert t.height == 2 and t["error"].null_count() == 2
    print(f"venv + install + run + sweep: {time.perf_counter() - t0:.1f} s")
