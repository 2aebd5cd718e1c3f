"""`pip install .` (a wheel, not editable) works outside the repository (issue 15).

The wheel is built offline from a copy of the sources (`pip wheel --no-deps --no-build-isolation`:
nothing is downloaded and the repository gets no build/ folder), installed with `--no-deps` into a
fresh venv made with `--system-site-packages` (the dependencies come from this Python's
site-packages), and run from a working folder outside the repository.

Which `sim` the venv imports: its own site-packages come before the system site-packages on
`sys.path`, and the editable install that may sit in the system site-packages is a meta-path
finder that its `.pth` file *appends* after the path finder, so the wheel's copy wins; the tests
check `sim.__file__` rather than trust this. `PYTHON*` variables are dropped so that a
`PYTHONPATH` pointing at the checkout cannot win either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what the build reads: the project file, the packages and the bundled data folders
SOURCES = ("pyproject.toml", "README.md", "sim", "policies", "hwprofiles", "traces", "models")
BUNDLED = ("sim/_bundled/hwprofiles/jetson.yaml", "sim/_bundled/hwprofiles/README.md",
           "sim/_bundled/traces/toy/meta.yaml", "sim/_bundled/traces/toy/routing.parquet",
           "sim/_bundled/models/toy-mixtral/config.json", "sim/_bundled/models/toy-mixtral/model.safetensors",
           "policies/data/sensitivity-mixtral-8x7b.yaml", "policies/data/adapmoe-mixtral-8x7b.yaml")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the venv's python, the wheel, a working folder outside the repository)."""
    setuptools = pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools here")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel", reason="setuptools < 70.1 builds wheels with the wheel package")
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "local.yaml", ".*")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", wheels], base)
    (whl,) = wheels.glob("moe_offload_sim-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], base)
    py = venv / "bin" / "python"
    # pip from the system site-packages installs into the running (venv) interpreter; --force-reinstall:
    # an installed copy of this version elsewhere (an editable install) must not satisfy it
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q", whl], base)
    work = base / "work"
    work.mkdir()
    return py, whl, work


def test_wheel_holds_every_module_and_the_bundled_data(installed):
    _, whl, _ = installed
    names = set(zipfile.ZipFile(whl).namelist())
    modules = sorted(str(p.relative_to(REPO)) for pkg in ("sim", "policies") for p in (REPO / pkg).rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages): {missing}"
    assert not [b for b in BUNDLED if b not in names], "bundled data missing from the wheel"
    assert not [n for n in names if n.endswith("/local.yaml")], "a calibrated local.yaml was shipped"


def _summary(stdout: str) -> str:
    return re.sub(r"simulated in [0-9.]+ s", "simulated in T s", stdout)


def test_installed_wheel_runs_outside_the_repository(installed, tmp_path):
    py, _, work = installed
    probe = ("import json, sim, sim.bundled as b; from policies.published import published; "
             "from sim.machine.hardware import PROFILES_DIR; "
             "print(json.dumps({'sim': sim.__file__, 'root': str(b.root()), 'profiles': str(PROFILES_DIR), "
             "'model': (b.models() / 'toy-mixtral' / 'config.json').is_file(), "
             "'S_l': len(published('sensitivity', 'mixtral-8x7b')['S_l'])}))")
    where = json.loads(_run([py, "-c", probe], work).stdout)
    venv = py.parent.parent.resolve()
    assert Path(where["sim"]).resolve().is_relative_to(venv), f"the venv imported {where['sim']}, not its wheel"
    assert Path(where["root"]).resolve().is_relative_to(venv) and Path(where["profiles"]).name == "hwprofiles"
    assert where["model"] and where["S_l"] == 32

    wheel = _run([py, "-m", "sim", "run", "hw=jetson.yaml", f"out={work / 'res'}"], work)
    here = _run([sys.executable, "-m", "sim", "run", "hw=jetson.yaml", f"out={tmp_path / 'res'}"], REPO)
    assert _summary(wheel.stdout) == _summary(here.stdout)
    assert "tpot_mean_s" in wheel.stdout
    for out in (work / "res", tmp_path / "res"):
        cfg = (out / "config.yaml").read_text()
        assert "hw_file: hwprofiles/jetson.yaml" in cfg, cfg  # the bundled file's name, either install
    assert (work / "res" / "report.html").is_file()

    listed = _run([py, "-m", "sim", "list"], work).stdout
    assert re.search(r"^hardware profiles: .*\bjetson\b", listed, flags=re.M), listed
    assert re.search(r"^traces: .*\btraces/toy\b", listed, flags=re.M), listed
    assert sorted(p.name for p in work.iterdir()) == ["res"]  # nothing else written in the working folder


# ------------------------------------------------ what a real run reads and writes by default
def test_realrun_defaults_run_here(tmp_path, monkeypatch):
    """`realrun` alone: a float preset it can compute with, a quick run, this machine's calibrated
    profile when the working folder (or the bundled hwprofiles/) has one."""
    pytest.importorskip("torch")
    from sim.machine.hardware import load_profile
    from sim.realrun.build import DEFAULT_MODEL, LOCAL_PROFILE, local_profile, parse_realrun

    monkeypatch.chdir(tmp_path)
    cfg, opts = parse_realrun([])
    assert cfg.model == DEFAULT_MODEL == "mixtral-mini" and opts.tokens == cfg.engine.max_tokens == 64
    assert cfg.hw == (LOCAL_PROFILE if local_profile() else "jetson.yaml")
    assert parse_realrun(["trace=toy"])[0].model == DEFAULT_MODEL  # the bundled trace, however named
    assert parse_realrun(["model=toy-mixtral"])[0].model == "toy-mixtral"
    (tmp_path / "c.yaml").write_text("model: toy-mixtral\n")
    assert parse_realrun(["config=c.yaml"])[0].model == "toy-mixtral"  # a config file's model is kept
    assert parse_realrun(["engine.max_tokens=5"])[0].engine.max_tokens == 5
    assert parse_realrun(["tokens=0"])[0].engine.max_tokens == 0  # the whole trace
    (tmp_path / "hwprofiles").mkdir()
    shutil.copy(REPO / "hwprofiles" / "rtx4090.yaml", tmp_path / "hwprofiles" / "local.yaml")
    cfg, _ = parse_realrun([])
    assert cfg.hw == LOCAL_PROFILE and load_profile(cfg.hw).path.resolve() == (tmp_path / LOCAL_PROFILE).resolve()


def test_stores_go_to_the_user_cache_and_are_announced(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import sim.realrun.store as st
    from sim.realrun.backend import Backend
    from sim.realrun.build import store_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # platformdirs' Linux cache folder
    if sys.platform.startswith("linux"):
        assert store_folder("", "x") == tmp_path / "cache" / "moe-offload-sim" / "realrun-store" / "x"
    assert store_folder(str(tmp_path / "mine"), "x") == tmp_path / "mine" / "x"
    layout = st.Layout(2, 4, ((16, 8), (8, 16)), "float32")
    backend = Backend("cpu", 1, pin=False)
    st.open_disk_store(tmp_path / "small", layout, backend, st.random_fill(layout, 0), "seed 0", progress=False).close()
    assert capsys.readouterr().err == ""  # a store of kilobytes is written without a word
    monkeypatch.setattr(st, "NOTICE_BYTES", 1)
    st.open_disk_store(tmp_path / "big", layout, backend, st.random_fill(layout, 0), "seed 0", progress=False).close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writing the expert store: 0.00 GB to" in err and str(tmp_path / "big") in err
