"""Hardware profiles (DESIGN 3.3): load and validate `hwprofiles/*.yaml`.

A profile describes one machine: the device's compute and memory, the host CPU (for experts
computed where they live, Fiddler-style), the capacities of the tiers, and the links that copy
experts between tiers. Every number in the YAML carries its source inline:

    memory_bandwidth_Bps: {value: 204.8e9, source: "NVIDIA Jetson AGX Orin datasheet DS-10662-001"}

The full schema, units and source conventions are in `hwprofiles/README.md`.

Errors: anything wrong with a profile (missing file, bad YAML, unknown / missing field, wrong
type, non-positive bandwidth, a number without a source, ...) raises `UserError` with one line
naming the file and the dotted field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from sim import bundled
from sim.errors import UserError, os_error
from sim.validate import PROFILE as PROFILE_LIMITS
from sim.validate import Range, check_number

PROFILES_DIR = bundled.hwprofiles()  # the checkout's hwprofiles/, or the copy a wheel ships
TIERS = ("device", "host", "storage")
EXPERT_TIERS = ("host", "storage")
SOURCE_KINDS = ("estimate", "derived", "measured")  # "<kind>: <why / how / command, date>"


@dataclass(frozen=True)
class Compute:
    """One compute engine (the accelerator, or the host CPU)."""

    memory_bandwidth_Bps: float  # effective bandwidth for batch-1 (GEMV) weight reads
    matmul_flops: float  # dense fp16/bf16 matmul throughput (CPU: fp32/bf16 as available)
    kernel_overhead_s: float  # fixed cost per kernel launch / op


@dataclass(frozen=True)
class LinkSpec:
    """A copy path between tiers; each of `channels` carries one transfer at `bandwidth_Bps`."""

    name: str  # "<from>_to_<to>", e.g. "host_to_device"
    bandwidth_Bps: float
    latency_s: float  # fixed cost per transfer
    channels: int  # concurrent transfers (copy engines / queues)
    shares_memory_bandwidth: bool  # copies consume the device's memory bandwidth (unified memory)


@dataclass(frozen=True)
class HardwareProfile:
    """One machine. `sources` maps each dotted numeric field to where its number comes from."""

    name: str
    description: str
    device: Compute
    cpu: Compute  # host CPU computing experts in host memory (Fiddler-style)
    device_memory_bytes: float
    host_memory_bytes: float  # with unified_memory: the same physical pool as device memory
    unified_memory: bool
    expert_tier: str  # "host" or "storage": where offloaded experts live
    links: dict[str, LinkSpec]  # at least "<expert_tier>_to_device"
    memory_reserve_bytes: float  # device memory kept for runtime, activations, fragmentation
    expert_cache_bytes: float | None  # explicit expert-cache budget; None = derive from capacity
    sources: dict[str, str]  # dotted field name -> where the number comes from
    path: Path | None = None
    #: host memory kept for the OS, the page cache and the framework when a tiered run derives its
    #: host-cache size (`host_cache.*` unset: docs/tiers.md); None: the profile gives none
    host_memory_reserve_bytes: float | None = None
    #: set by the runner for a tiered run (experts on storage behind a host-DRAM cache): the device
    #: then copies experts from host memory (`expert_link` is `host_to_device`)
    host_tier: bool = False

    @property
    def expert_link(self) -> LinkSpec:
        """The link that brings an offloaded expert to the device (in a tiered run: from the host cache)."""
        return self.links["host_to_device" if self.host_tier else f"{self.expert_tier}_to_device"]

    def expert_cache_budget_bytes(self, non_expert_bytes: float, kv_cache_bytes: float = 0.0) -> float:
        """Device bytes available to the expert cache (the explicit budget if the profile sets one).

        Derived: device_memory_bytes - non_expert_bytes - kv_cache_bytes - memory_reserve_bytes,
        floored at 0. The caller (the engine) supplies the model's resident non-expert weights and
        its KV cache for the simulated context.
        """
        if self.expert_cache_bytes is not None:
            return self.expert_cache_bytes
        free = self.device_memory_bytes - non_expert_bytes - kv_cache_bytes - self.memory_reserve_bytes
        return max(0.0, free)


# ------------------------------------------------------------------ YAML reading
_FLOAT_RE = re.compile(  # YAML 1.2-style floats that YAML 1.1 reads as strings (204.8e9, 1e9)
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[0-9][0-9_]*[eE][-+]?[0-9]+)$"
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `204.8e9` as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+.0123456789"))


class _Reader:
    """Validates one parsed profile; every error names the file and the dotted field."""

    def __init__(self, path: Path):
        self.path = path
        self.sources: dict[str, str] = {}

    def fail(self, field: str, problem: str) -> UserError:
        shown = _display(self.path)
        where = f"{shown}: {field}: " if field else f"{shown}: "
        return UserError(where + problem)

    def mapping(self, data: Any, field: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
        what = f"'{field}'" if field else "the profile"
        if not isinstance(data, dict):
            raise self.fail(field, f"expected a mapping for {what}, got {type(data).__name__}")
        valid = list(required) + list(optional)
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise self.fail(
                _join(field, str(unknown[0])), f"unknown field; valid fields of {what}: {', '.join(valid)}"
            )
        missing = [k for k in required if k not in data]
        if missing:
            raise self.fail(
                _join(field, missing[0]), f"missing field (required in {what}: {', '.join(required)})"
            )
        return data

    def text(self, data: dict, key: str, parent: str = "") -> str:
        field = _join(parent, key)
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def flag(self, data: dict, key: str, parent: str = "") -> bool:
        value = data[key]
        if not isinstance(value, bool):
            raise self.fail(_join(parent, key), f"expected true or false, got {value!r}")
        return value

    def number(
        self,
        data: dict,
        key: str,
        parent: str = "",
        *,
        minimum: float = 0.0,
        strict: bool = True,
        integer: bool = False,
    ) -> float:
        """A `{value, source}` number; > minimum if strict else >= minimum."""
        field = _join(parent, key)
        entry = data[key]
        if not isinstance(entry, dict):
            raise self.fail(
                field,
                f"expected {{value: <number>, source: <where it comes from>}} (every number carries its source), got {entry!r}",
            )
        self.mapping(entry, field, ["value", "source"])
        value = _as_number(entry["value"])
        if value is None:
            raise self.fail(
                field, f"value must be a raw number in SI units (no unit strings), got {entry['value']!r}"
            )
        rng = PROFILE_LIMITS.get(key) or Range(lo=minimum, lo_open=strict, integer=integer)
        try:
            value = check_number(value, field, rng)
        except UserError as err:  # "value must be ...": the valid range, from sim/validate.py
            got, _, need = str(err).split(": ", 1)[1].partition(" (must be ")
            raise self.fail(field, f"value must be {need.removesuffix(')')}, got {got}") from None
        self.sources[field] = self.source(entry["source"], field)
        return int(value) if rng.integer else float(value)

    def source(self, src: Any, field: str) -> str:
        if not isinstance(src, str) or not src.strip():
            raise self.fail(
                field,
                "every number needs a source (a datasheet, 'estimate: <why>', "
                "'derived: <how>' or 'measured: <command>, <date>')",
            )
        src = src.strip()
        kind, colon, rest = src.partition(":")
        if colon and kind.strip().lower() in SOURCE_KINDS and not rest.strip():
            raise self.fail(field, f"source '{src}' says nothing after '{kind}:'")
        return src

    def compute(self, data: dict, key: str) -> Compute:
        d = self.mapping(data[key], key, [f.name for f in fields(Compute)])
        return Compute(
            memory_bandwidth_Bps=self.number(d, "memory_bandwidth_Bps", key),
            matmul_flops=self.number(d, "matmul_flops", key),
            kernel_overhead_s=self.number(d, "kernel_overhead_s", key, strict=False),
        )

    def link(self, data: Any, name: str) -> LinkSpec:
        field = _join("links", name)
        ends = name.split("_to_")
        if len(ends) != 2 or ends[0] not in TIERS or ends[1] not in TIERS or ends[0] == ends[1]:
            raise self.fail(field, f"link names are '<from>_to_<to>' with tiers {', '.join(TIERS)}")
        d = self.mapping(data, field, [f.name for f in fields(LinkSpec) if f.name != "name"])
        return LinkSpec(
            name=name,
            bandwidth_Bps=self.number(d, "bandwidth_Bps", field),
            latency_s=self.number(d, "latency_s", field, strict=False),
            channels=int(self.number(d, "channels", field, minimum=1, strict=False, integer=True)),
            shares_memory_bandwidth=self.flag(d, "shares_memory_bandwidth", field),
        )

    def profile(self, data: Any) -> HardwareProfile:
        top_required = [
            "name",
            "description",
            "device",
            "cpu",
            "device_memory_bytes",
            "host_memory_bytes",
            "unified_memory",
            "expert_tier",
            "links",
            "memory_reserve_bytes",
        ]
        d = self.mapping(data, "", top_required, ["expert_cache_bytes", "host_memory_reserve_bytes"])
        device_mem = self.number(d, "device_memory_bytes")
        reserve = self.number(d, "memory_reserve_bytes", strict=False)
        if reserve >= device_mem:
            raise self.fail(
                "memory_reserve_bytes",
                f"reserve {reserve:g} must be below device_memory_bytes {device_mem:g}",
            )
        cache = None
        if d.get("expert_cache_bytes") is not None:
            cache = self.number(d, "expert_cache_bytes")
            if cache > device_mem - reserve:
                raise self.fail(
                    "expert_cache_bytes",
                    f"{cache:g} exceeds device_memory_bytes - memory_reserve_bytes "
                    f"= {device_mem - reserve:g}",
                )
        host_mem = self.number(d, "host_memory_bytes")
        host_reserve = None
        if d.get("host_memory_reserve_bytes") is not None:
            host_reserve = self.number(d, "host_memory_reserve_bytes", strict=False)
            if host_reserve >= host_mem:
                raise self.fail("host_memory_reserve_bytes",
                                f"reserve {host_reserve:g} must be below host_memory_bytes {host_mem:g}")
        tier = self.text(d, "expert_tier")
        if tier not in EXPERT_TIERS:
            raise self.fail("expert_tier", f"must be one of {', '.join(EXPERT_TIERS)}, got {tier!r}")
        if not isinstance(d["links"], dict) or not d["links"]:
            raise self.fail("links", "expected a mapping of links, e.g. host_to_device: {...}")
        links = {str(name): self.link(spec, str(name)) for name, spec in d["links"].items()}
        if f"{tier}_to_device" not in links:
            raise self.fail(
                "links",
                f"expert_tier is {tier!r} but there is no '{tier}_to_device' link "
                f"(links: {', '.join(links)})",
            )
        return HardwareProfile(
            name=self.text(d, "name"),
            description=self.text(d, "description"),
            device=self.compute(d, "device"),
            cpu=self.compute(d, "cpu"),
            device_memory_bytes=device_mem,
            host_memory_bytes=host_mem,
            host_memory_reserve_bytes=host_reserve,
            unified_memory=self.flag(d, "unified_memory"),
            expert_tier=tier,
            links=links,
            memory_reserve_bytes=reserve,
            expert_cache_bytes=cache,
            sources=dict(sorted(self.sources.items())),
            path=self.path,
        )


def _display(path: Path) -> str:
    """A short name for messages: relative to the cwd or to the bundled root when possible."""
    for base in (Path.cwd(), bundled.root()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _as_number(value: Any) -> float | None:
    """An int/float, or a string that parses as a float (YAML 1.1 leaves `1e9` a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------ public API
def list_profiles() -> list[str]:
    """Names of the shipped profiles (`hwprofiles/*.yaml`, without the suffix), sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _resolve(name_or_path: str) -> Path:
    """A path as given (`.yaml` optional); a bare name (no folder part) is looked up in
    `hwprofiles/`. A path that does not exist is an error naming it, never another file."""
    from sim.paths import resolve_input

    return resolve_input(name_or_path, PROFILES_DIR, what="hardware profile", suffixes=(".yaml", ".yml"),
                         available=list_profiles(), example="jetson.yaml")


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load and validate a hardware profile by path or by name (`jetson`, `jetson.yaml`)."""
    path = _resolve(str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{_display(path)}: hardware profile is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise os_error(e, _display(path), "reading hardware profile") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{_display(path)}: not valid YAML{at}: {problem}") from None
    if data is None:
        raise UserError(f"{_display(path)}: empty hardware profile")
    return _Reader(path).profile(data)
