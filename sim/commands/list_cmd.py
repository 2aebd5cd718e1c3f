"""`python -m sim list [policies|presets|hardware|models|traces] [plugins=MODULE,...]`

Without a part, all of them: every registered policy per family with the first line of its
docstring and its knobs (`KEY type default meaning`), the policy presets, the hardware profiles,
the model presets and the bundled traces. Policies and presets of plug-ins are listed too: the
installed ones (entry-point group `moe_offload_sim.policies`) always, others with `plugins=`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from sim import bundled

PARTS = ("policies", "presets", "hardware", "models", "traces")


@dataclass
class ListOptions:
    plugins: str = ""  # plug-in modules (pkg.module or FILE.py, comma-separated) whose policies are listed too


def main(argv: list[str]) -> int:
    from sim.args import parse_args
    from sim.errors import UserError

    parts = [a for a in argv if "=" not in a]
    bad = [p for p in parts if p not in PARTS]
    if bad or len(parts) > 1:
        raise UserError(f"list takes one of {', '.join(PARTS)} (or nothing: all of them) and plugins=; "
                        f"got {' '.join(parts)!r}")
    opts = parse_args(ListOptions, [a for a in argv if "=" in a], allow_config_file=False)
    from policies.registry import load_entry_points, load_plugins

    load_entry_points()
    load_plugins(opts.plugins)
    for part in parts or PARTS:
        print(SECTIONS[part]())
        sys.stdout.flush()
    return 0


def policy_summary(cls: type) -> str:
    """The first line of a policy class's docstring, else of its module's."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def policies_text() -> str:
    from policies.registry import FAMILIES
    from sim.help import schema_keys

    out = ["policies (per family: NAME  what it does; then its knobs: KEY  type  default  meaning):"]
    for fam, reg in FAMILIES.items():
        out.append(f"  {fam}:")
        names = reg.names()
        width = max(len(n) for n in names)
        for name in names:
            cls = reg.get(name)
            out.append(f"    {name.ljust(width)}  {policy_summary(cls)}".rstrip())
            schema = getattr(cls, "Knobs", None)
            keys = schema_keys(schema, f"{fam}.") if schema is not None else []
            if keys:
                from sim.help import keys_table

                out.append(keys_table(keys, indent="        "))
        if fam == "cache":
            out.append("    (every cache policy: cache.slots=N or cache.bytes=B, the cache size; default: what the "
                       "hardware's memory leaves)")
    return "\n".join(out)


def presets_text() -> str:
    from policies.presets import PRESETS, preset_names

    out = ["policy presets (policy=NAME):"]
    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        p = PRESETS[name]
        out.append(f"  {name.ljust(width)}  " + "  ".join(f"{sec}={p[sec].get('name')}" for sec in
                                                         ("gating", "prefetch", "cache", "placement")))
    return "\n".join(out)


def hardware_text() -> str:
    from sim.machine.hardware import list_profiles

    return f"hardware profiles: {', '.join(list_profiles())}"


def models_text() -> str:
    from sim.machine.models import PRESETS

    lines = ["model presets:"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:20s} {p.layers:3d} layers {p.experts:4d} experts top-{p.top_k}  "
                     f"{p.expert_bytes / 1e6:8.1f} MB/expert at {p.bits:g} bits")
    return "\n".join(lines)


def traces_text() -> str:
    root = bundled.root()  # named as in the repository (traces/toy), in a checkout and in a wheel alike
    traces = sorted(p.parent.relative_to(root) for p in bundled.traces().glob("*/meta.yaml"))
    return f"traces: {', '.join(map(str, traces)) or '(none)'}"


SECTIONS = {"policies": policies_text, "presets": presets_text, "hardware": hardware_text, "models": models_text,
            "traces": traces_text}
