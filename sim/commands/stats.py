"""`python -m sim stats trace=DIR [sensitivity=FILE] [T=0.005,0.01] [phase=decode] [json=FILE]
[segment=1,4,16,64] [cache_experts=C] [slots=16,32,64]`

Prints a per-layer table and a summary of a trace's routing (definitions in `sim.trace.stats`):
expert-usage entropy vs uniform, reuse of the previous token's experts vs chance, pre-gating
accuracy per depth (when the trace has `pregate_d` columns), and the AdapMoE single-expert share
for each threshold T (when S_l is known: from the trace's meta.yaml or `sensitivity=FILE`).
Then local routing consistency (`sim.trace.locality`): SRP and SCH per segment length m, against
the same routing shuffled, and the Belady ceiling: the best demand-hit rate any eviction policy
reaches without prefetch at each global cache size (`slots=[]` skips it; `segment=[]` skips SRP/SCH).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError
from sim.runner import resolve_trace_path
from sim.trace.format import read_trace
from sim.trace.locality import DEFAULT_SEGMENTS, ceiling_slots, check_locality_args
from sim.trace.stats import read_sensitivity, summarize


@dataclass
class StatsArgs:
    trace: str = ""  # trace folder
    sensitivity: str = ""  # file with S_l per layer (overrides the trace's own)
    T: list[float] = field(default_factory=lambda: [0.005])  # AdapMoE thresholds
    phase: str = "decode"  # decode | prefill | all
    json: str = ""  # write the numbers here
    segment: list[int] = field(default_factory=lambda: list(DEFAULT_SEGMENTS))  # SRP/SCH segment lengths m
    cache_experts: int | None = None  # SCH's cache size per layer (default 2 * top_k, at most the experts)
    slots: list[int] | None = None  # Belady ceiling cache sizes (default 16,32,64,128,256 clipped; [] skips)


def main(argv: list[str]) -> int:
    # `T=0.001,0.005` is friendlier than OmegaConf's `T=[0.001,0.005]`; accept both.
    argv = [f"T=[{a[2:]}]" if re.fullmatch(r"T=[^\[].*", a) else a for a in argv]
    argv = [re.sub(r"^(segment|slots)=([^\[].*)$", r"\1=[\2]", a) for a in argv]  # the same for these
    args = parse_args(StatsArgs, argv)  # T: finite, >= 0 (sim/validate.py)
    check_counts(args)
    if not args.trace:
        raise UserError("stats needs trace=DIR (a trace folder)")
    with contextlib.ExitStack() as claims:
        if args.json:  # checked and claimed before the work, not after the table is printed
            out = Path(args.json)
            if not out.parent.is_dir():
                raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
            claims.enter_context(atomic.claim_file(out, what="json file"))
        trace = read_trace(resolve_trace_path(args.trace))
        s_l = read_sensitivity(args.sensitivity, trace.model.layers) if args.sensitivity else None
        m = trace.model  # the checks that need the trace, before any work
        check_locality_args(args.segment, args.cache_experts, m.experts, m.top_k)
        if args.slots:
            ceiling_slots(args.slots, m.layers, m.experts, m.top_k)
        stats = summarize(trace, T=args.T, s_l=s_l, phase=args.phase, segments=args.segment,
                          cache_experts=args.cache_experts, slots=args.slots)
        stats["trace"] = str(args.trace)
        stats["sensitivity_source"] = args.sensitivity or ("trace" if trace.sensitivity is not None else None)
        text = json.dumps(stats, indent=1) + "\n"
        if args.json:
            atomic.write_text(out, text)
    print(format_table(stats))
    if args.json:
        print(f"wrote {out}")
    return 0


def check_counts(args: StatsArgs) -> None:
    """Refuse a segment length, cache size or slot count below 1 (a UserError naming the key)."""
    from sim.validate import COUNT, check_number

    for i, m in enumerate(args.segment):
        check_number(m, f"segment[{i}]", COUNT)
    if args.cache_experts is not None:
        check_number(args.cache_experts, "cache_experts", COUNT)
    for i, c in enumerate(args.slots or ()):
        check_number(c, f"slots[{i}]", COUNT)


def table_m(segments: list[int]) -> int:
    """The segment length shown per layer: 16, or the listed one closest to it (the smaller on a tie)."""
    return min(segments, key=lambda m: (abs(m - 16), m))


def _tokens(m: int) -> str:
    return f"{m} token" if m == 1 else f"{m} tokens"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(s: dict[str, Any]) -> str:
    """The per-layer table and the summary lines, as printed by `stats`."""
    L = s["layers"]
    cols: list[tuple[str, list[str]]] = [
        ("layer", [str(i) for i in range(L)]),
        ("H bits", [_f(x, ".2f") for x in s["entropy_bits"]["by_layer"]]),
        ("reuse", [_f(x) for x in s["reuse"]["by_layer"]]),
    ]
    for d, res in s["pregate"].items():
        cols.append((f"pg{d} top{s['top_k']}", [_f(x) for x in res["topk"]["by_layer"]]))
        cols.append((f"pg{d} top1", [_f(x) for x in res["top1_in_topk"]["by_layer"]]))
    ada = s["adapmoe"]
    if ada:
        cols.append(("S_l", [_f(x, ".4g") for x in ada["S_l"]]))
        for th in ada["thresholds"]:
            cols.append((f"1-exp T={th['T']:g}", [_f(x) for x in th["single_share_by_layer"]]))
    loc = s.get("locality")
    if loc:
        tm = str(table_m(loc["segments"]))
        if loc["srp"] and loc["srp"].get(tm):
            cols.append((f"SRP m={tm}", [_f(x) for x in loc["srp"][tm]["by_layer"]]))
        cols.append((f"SCH m={tm} c={loc['cache_experts']}", [_f(x) for x in loc["sch"][tm]["by_layer"]]))
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals in cols]
    lines = ["  ".join(h.rjust(w) for (h, _), w in zip(cols, widths, strict=True))]
    for i in range(L):
        lines.append("  ".join(vals[i].rjust(w) for (_, vals), w in zip(cols, widths, strict=True)))
    e, r = s["entropy_bits"], s["reuse"]
    lines += [
        "",
        f"trace {s.get('trace', '')}: model {s['model']}, {L} layers x {s['experts']} experts, top-{s['top_k']}; "
        f"{s['tokens']} {s['phase']} tokens in {s['sequences']} sequence(s)",
        f"expert-usage entropy: mean {_f(e['mean'], '.3f')} bits per layer (uniform routing: {e['uniform']:.3f})",
        f"reuse of the previous token's experts: {_f(r['mean'])} over {r['pairs']} token pairs "
        f"(uniform random: {r['uniform']:.3f})",
    ]
    if s["pregate"]:
        for d, res in s["pregate"].items():
            lines.append(f"pre-gating depth {d}: top-{s['top_k']} accuracy {_f(res['topk']['mean'])}, "
                         f"top-1 in true top-{s['top_k']} {_f(res['top1_in_topk']['mean'])}, "
                         f"top-1 exact {_f(res['top1_exact']['mean'])} (mean over layers {d}..{L - 1})")
    else:
        lines.append("pre-gating: the trace has no pregate_d columns")
    if ada:
        src = s.get("sensitivity_source") or "given"
        for th in ada["thresholds"]:
            lines.append(f"AdapMoE T={th['T']:g} (S_l from {src}): {_f(th['single_share'])} of (token, layer) "
                         f"pairs on one expert; {_f(th['executions_saved'])} fewer expert executions")
    else:
        lines.append("AdapMoE: no S_l (the trace has no sensitivities; pass sensitivity=FILE)")
    lines += locality_lines(s) + ceiling_lines(s)
    return "\n".join(lines)


def locality_lines(s: dict[str, Any]) -> list[str]:
    """The summary lines of SRP and SCH, one per segment length (none when not computed)."""
    loc = s.get("locality")
    if not loc:
        return []
    k, c = s["top_k"], loc["cache_experts"]
    out = [f"segment locality: non-overlapping windows of m consecutive {s['phase']} tokens of a sequence "
           f"(a shorter tail dropped), mean over layers; in brackets the same routing shuffled within each layer"]
    for m in loc["segments"]:
        key, g = str(m), loc["segment_counts"][str(m)]
        if not g:
            out.append(f"  m={m}: no sequence has {m} {s['phase']} tokens")
            continue
        sch = loc["sch"][key]
        text = f"  m={m} ({g} segments): "
        if loc["srp"] and loc["srp"].get(key):
            srp = loc["srp"][key]
            text += (f"SRP {_f(srp['mean'])} ({_f(srp['shuffled_mean'])}): the best fixed {k} experts of a layer "
                     f"carry {_pct(srp['mean'])} of the routing weight of {_tokens(m)}; ")
        text += (f"SCH c={c} {_f(sch['mean'])} ({_f(sch['shuffled_mean'])}): a per-layer cache of {c} experts "
                 f"fixed for {_tokens(m)} would hit at most {_pct(sch['mean'])}")
        out.append(text)
    if not loc["srp"]:
        out.append("  SRP: the trace records no gating weights")
    return out


def ceiling_lines(s: dict[str, Any]) -> list[str]:
    """The summary lines of the Belady ceiling, one per cache size (none when not computed)."""
    ceil = s.get("belady_ceiling")
    if not ceil:
        return []
    out = ["Belady ceiling (exact MIN, one global cache, top-k gating, no prefetch, prefill simulated; "
           "decode hits / expert uses, as a run's hit_rate):"]
    for c in ceil["slots"]:
        r = ceil["by_slots"][str(c)]
        out.append(f"  {c} slots: {_f(r['mean'])}: no eviction policy can hit more than {_pct(r['mean'])} "
                   f"at {c} slots without prefetch")
    return out
