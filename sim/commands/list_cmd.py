"""`python -m sim list`: policies, policy presets, hardware profiles, model presets and traces."""

from __future__ import annotations

from sim import REPO_ROOT


def main(argv: list[str]) -> int:
    if argv:
        from sim.errors import UserError

        raise UserError(f"list takes no arguments, got {' '.join(argv)!r}")
    from policies.presets import PRESETS as POLICY_PRESETS
    from policies.registry import FAMILIES
    from sim.machine.hardware import list_profiles
    from sim.machine.models import PRESETS

    print("policies:")
    for fam, reg in FAMILIES.items():
        print(f"  {fam:10s} {', '.join(reg.names())}")
    print(f"policy presets: {', '.join(sorted(POLICY_PRESETS))}")
    print(f"hardware profiles: {', '.join(list_profiles())}")
    print("model presets:")
    for p in PRESETS.values():
        print(f"  {p.name:20s} {p.layers:3d} layers {p.experts:4d} experts top-{p.top_k}  "
              f"{p.expert_bytes / 1e6:8.1f} MB/expert at {p.bits:g} bits")
    traces = sorted(p.parent.relative_to(REPO_ROOT) for p in (REPO_ROOT / "traces").glob("*/meta.yaml"))
    print(f"traces: {', '.join(map(str, traces)) or '(none)'}")
    return 0
