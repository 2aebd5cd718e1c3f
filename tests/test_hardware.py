"""Hardware profiles: the shipped ones load with a source per number; bad ones are refused clearly."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from sim import REPO_ROOT
from sim.errors import UserError
from sim.machine.hardware import PROFILES_DIR, Compute, HardwareProfile, list_profiles, load_profile
from sim.machine.models import load_preset

REQUIRED = {"jetson", "jetson-agx-orin", "rtx4090", "rtx3090", "t4", "a100", "h100", "h200"}


def numeric_fields(p: HardwareProfile) -> set[str]:
    """Every dotted numeric field a profile has (what must carry a source)."""
    names = {"device_memory_bytes", "host_memory_bytes", "memory_reserve_bytes"}
    if p.expert_cache_bytes is not None:
        names.add("expert_cache_bytes")
    if p.host_memory_reserve_bytes is not None:
        names.add("host_memory_reserve_bytes")
    for part in ("device", "cpu"):
        names |= {f"{part}.{f.name}" for f in dataclasses.fields(Compute)}
    for name in p.links:
        names |= {f"links.{name}.{f}" for f in ("bandwidth_Bps", "latency_s", "channels")}
    return names


# ------------------------------------------------------------------ shipped profiles
def test_required_profiles_are_shipped():
    assert REQUIRED <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_loads_with_a_source_per_number(name):
    p = load_profile(name)
    assert p.name == name
    assert p.expert_tier in ("host", "storage")
    assert p.expert_link is p.links[f"{p.expert_tier}_to_device"]
    assert set(p.sources) == numeric_fields(p)
    assert all(isinstance(s, str) and s.strip() for s in p.sources.values())
    assert all(isinstance(v, float) for v in (p.device.memory_bandwidth_Bps, p.device_memory_bytes))
    assert isinstance(p.expert_link.channels, int) and p.expert_link.channels >= 1
    assert 0 <= p.memory_reserve_bytes < p.device_memory_bytes
    if p.unified_memory:
        assert p.expert_link.shares_memory_bandwidth


def test_readme_lists_every_shipped_profile():
    readme = (PROFILES_DIR / "README.md").read_text()
    for name in list_profiles():
        assert f"`{name}`" in readme, name


def test_no_absolute_paths_in_profiles():
    import re

    for path in PROFILES_DIR.iterdir():
        text = path.read_text()
        # a quoted or space-led absolute path such as " /some/dir/file"
        assert not re.search(r"""(?:^|[\s'"])/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/""", text), path.name


def test_lookup_by_name_suffix_and_path(tmp_path, monkeypatch):
    by_name, by_file = load_profile("jetson"), load_profile("jetson.yaml")
    by_path = load_profile(str(PROFILES_DIR / "jetson.yaml"))
    assert by_name == by_file == by_path
    mine = tmp_path / "mine.yaml"
    shutil.copy(PROFILES_DIR / "jetson.yaml", mine)
    assert load_profile(str(mine)).path == mine
    assert load_profile(str(tmp_path / "mine")).path == mine  # ".yaml" optional for paths too
    monkeypatch.chdir(tmp_path)
    assert load_profile("mine.yaml").path == Path("mine.yaml")  # a path wins over hwprofiles/


def test_jetson_cannot_hold_mixtral_2bit():
    """256 experts x ~66 MB (~17 GB) plus non-expert weights exceed the Orin Nano's memory."""
    m, p = load_preset("mixtral-8x7b"), load_profile("jetson")
    assert 60e6 < m.expert_bytes < 70e6
    need = m.layers * m.experts * m.expert_bytes + m.non_expert_bytes
    assert need > p.device_memory_bytes
    slots = p.expert_cache_budget_bytes(m.non_expert_bytes) // m.expert_bytes
    assert m.top_k <= slots < m.layers * m.experts
    assert p.unified_memory and p.expert_tier == "storage" and p.expert_link.shares_memory_bandwidth


def test_agx_orin_holds_2bit_mixtral_but_not_fp16():
    p = load_profile("jetson-agx-orin")
    q2 = load_preset("mixtral-8x7b")
    fp16 = load_preset("mixtral-8x7b", bits=16, group_size=0, attn_bits=16)
    for m, fits in ((q2, True), (fp16, False)):
        budget = p.expert_cache_budget_bytes(m.non_expert_bytes, kv_cache_bytes=1e9)
        assert (budget >= m.layers * m.experts * m.expert_bytes) is fits


def test_expert_cache_budget_derivation():
    p = load_profile("rtx4090")
    got = p.expert_cache_budget_bytes(non_expert_bytes=1e9, kv_cache_bytes=2e9)
    assert got == p.device_memory_bytes - 1e9 - 2e9 - p.memory_reserve_bytes
    assert p.expert_cache_budget_bytes(non_expert_bytes=1e12) == 0.0
    explicit = dataclasses.replace(p, expert_cache_bytes=5e9)
    assert explicit.expert_cache_budget_bytes(1e9, 2e9) == 5e9


# ------------------------------------------------------------------ bad profiles
def _base() -> dict:
    return yaml.safe_load((PROFILES_DIR / "jetson.yaml").read_text())


def _write(tmp_path: Path, data: object, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _set(d: dict, dotted: str, value: object) -> dict:
    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = d
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return d


_DELETE = object()

BAD = [
    # (dotted field, new value, words the message must contain)
    ("surprise", 1, ["surprise", "unknown field", "device_memory_bytes"]),
    (
        "device.bandwidth",
        {"value": 1, "source": "x"},
        ["device.bandwidth", "unknown field", "memory_bandwidth_Bps"],
    ),
    ("device.matmul_flops.unit", "TFLOPS", ["device.matmul_flops.unit", "unknown field", "value, source"]),
    ("device_memory_bytes", _DELETE, ["device_memory_bytes", "missing field"]),
    ("cpu.kernel_overhead_s", _DELETE, ["cpu.kernel_overhead_s", "missing field"]),
    ("links.storage_to_device.channels", _DELETE, ["links.storage_to_device.channels", "missing field"]),
    ("device_memory_bytes.value", "8 GB", ["device_memory_bytes", "raw number"]),
    ("device_memory_bytes", 8e9, ["device_memory_bytes", "source"]),
    ("unified_memory", "yes", ["unified_memory", "true or false"]),
    ("device", 5, ["device", "mapping"]),
    ("links", [], ["links", "mapping"]),
    ("name", 3, ["name", "string"]),
    ("device.memory_bandwidth_Bps.value", -1.0, ["device.memory_bandwidth_Bps", ">= 1000 B/s"]),
    ("device.matmul_flops.value", 0, ["device.matmul_flops", ">= 1000"]),
    ("cpu.memory_bandwidth_Bps.value", 0.0, ["cpu.memory_bandwidth_Bps", ">= 1000"]),
    ("device_memory_bytes.value", 0, ["device_memory_bytes", "> 0"]),
    ("host_memory_bytes.value", -8e9, ["host_memory_bytes", "> 0"]),
    ("links.storage_to_device.bandwidth_Bps.value", 0, ["links.storage_to_device.bandwidth_Bps", ">= 1000"]),
    ("links.storage_to_device.bandwidth_Bps.value", 1e-300, ["links.storage_to_device.bandwidth_Bps", ">= 1000"]),
    ("links.storage_to_device.channels.value", 1e9, ["links.storage_to_device.channels", "<= 1024"]),
    ("links.storage_to_device.latency_s.value", -1e-6, ["links.storage_to_device.latency_s", ">= 0"]),
    ("device.kernel_overhead_s.value", float("nan"), ["device.kernel_overhead_s", "finite"]),
    ("links.storage_to_device.channels.value", 0, ["links.storage_to_device.channels", ">= 1"]),
    ("links.storage_to_device.channels.value", 1.5, ["links.storage_to_device.channels", "whole number"]),
    ("expert_tier", "host", ["links", "host_to_device"]),
    ("expert_tier", "gpu", ["expert_tier", "host, storage"]),
    ("links.gpu_to_device", {}, ["links.gpu_to_device", "<from>_to_<to>"]),
    ("device.matmul_flops.source", "", ["device.matmul_flops", "source"]),
    ("device.matmul_flops.source", _DELETE, ["device.matmul_flops.source", "missing field"]),
    ("host_memory_bytes.source", "estimate:", ["host_memory_bytes", "estimate"]),
    ("memory_reserve_bytes.value", 9e9, ["memory_reserve_bytes", "below device_memory_bytes"]),
    ("expert_cache_bytes", {"value": 7.9e9, "source": "x"}, ["expert_cache_bytes", "exceeds"]),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD])
def test_bad_profile_is_refused_with_a_clear_line(tmp_path, field, value, words):
    path = _write(tmp_path, _set(_base(), field, value))
    with pytest.raises(UserError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert "bad.yaml" in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: [unclosed\n", ["not valid YAML", "line"]),
        ("name: a\nname: b\n", ["not valid YAML", "duplicate key 'name'"]),
        ("", ["empty"]),
        ("- a list\n", ["mapping"]),
    ],
)
def test_unparseable_profile_is_refused(tmp_path, text, words):
    with pytest.raises(UserError) as err:
        load_profile(str(_write(tmp_path, text)))
    assert "bad.yaml" in str(err.value) and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_missing_profile_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        load_profile("no-such-device")
    msg = str(err.value)
    assert "no-such-device" in msg and "not found" in msg
    assert all(name in msg for name in REQUIRED)


def test_scientific_notation_in_any_spelling(tmp_path):
    """YAML 1.1 reads 1e9 and 204.8e9 as strings; the loader reads them as floats."""
    text = (PROFILES_DIR / "jetson.yaml").read_text()
    text = text.replace("value: 71.4e9", "value: 714e8").replace("value: 1.36e9", 'value: "1.36E+9"')
    p = load_profile(str(_write(tmp_path, text, "sci.yaml")))
    assert p.device.memory_bandwidth_Bps == 71.4e9
    assert p.expert_link.bandwidth_Bps == 1.36e9
    assert p.links["storage_to_device"].latency_s == 100e-6


def test_profiles_dir_is_inside_the_repository():
    assert PROFILES_DIR == REPO_ROOT / "hwprofiles"
