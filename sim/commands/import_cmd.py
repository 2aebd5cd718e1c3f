"""`python -m sim import FILE format=jsonl|csv|npz|vllm model=PRESET out=DIR [strict=true] [seq_field=..]`

Converts an external routing log (expert ids + weights, no logits) to a trace folder (format v1,
spec in `traces/README.md`; layouts in `sim.trace.importer`). The model shape comes from `model=`: a
preset, a model YAML file, a Hugging Face config.json or checkpoint folder, with `model.FIELD=VALUE`
on top (`model=deepseek-v2-lite model.layers=25`; docs/models.md); the trace records that model.
Tokens missing from some layers are dropped and counted (meta.yaml `source`), reported in one
printed line; `strict=true` refuses such a log instead. `format` defaults to the file extension.
`format=vllm`: the routed experts vLLM returns (`enable_return_routed_experts`: ids, no weights) as
a `.npy`, `.npz` or JSON Lines file (docs/import.md); the trace's weights are 1/top_k, flagged
`source.weights_recorded: false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError
from sim.machine.model_source import load_model
from sim.trace.format import fill_trace
from sim.trace.importer import EXTENSIONS, FORMATS, import_log


@dataclass
class ImportArgs:
    file: str = ""  # the log (also accepted as the first, positional argument)
    format: str = ""  # jsonl | csv | npz | vllm (default: from the file extension; .npy: vllm)
    model: str = ""  # the log's model: a preset, a model YAML file, a config.json or checkpoint folder
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model.FIELD=VALUE: fields set on top of the model
    out: str = ""  # trace folder to create
    strict: bool = False  # refuse a log with tokens missing from some layers
    overwrite: bool = False  # replace an existing `out`
    routing: str = "softmax_topk"  # meta.yaml model.routing: the model's routing rule
    seq_field: str = ""  # explicit field / column / array names (default: the aliases)
    pos_field: str = ""
    layer_field: str = ""
    experts_field: str = ""
    weights_field: str = ""
    phase_field: str = ""


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0]:
        argv = [f"file={argv[0]}", *argv[1:]]
    args = parse_args(ImportArgs, argv)
    for name in ("file", "model", "out"):
        if not getattr(args, name):
            raise UserError(f"import needs {name}=... (usage: python -m sim import FILE format="
                            f"{'|'.join(FORMATS)} model=PRESET out=DIR)")
    path = Path(args.file)
    fmt = args.format or EXTENSIONS.get(path.suffix.lower(), "")
    if fmt not in FORMATS:
        what = f"unknown format {fmt!r}" if args.format else f"cannot tell the format of {path.name}"
        raise UserError(f"{what}; known: {', '.join(FORMATS)} (pass format=...)")
    preset = load_model(args.model, args.model_overrides)
    if not path.is_file():
        raise UserError(f"import file not found: {path}")
    out = Path(args.out)
    names = {role: getattr(args, f"{role}_field") for role in ("seq", "pos", "layer", "experts", "weights", "phase")}
    # claimed before the log is read; a trace takes about as much room as its log (zstd Parquet)
    with atomic.new_dir(out, overwrite=args.overwrite, need_bytes=path.stat().st_size + 1e6,
                        replaces=("meta.yaml", "routing.parquet")) as tmp:  # overwrite= replaces a trace only
        trace, report = import_log(path, fmt, preset, strict=args.strict,
                                   names={k: v for k, v in names.items() if v})
        if args.routing != trace.model.routing:
            trace.model = replace(trace.model, routing=args.routing)
        fill_trace(trace, tmp)
    print(f"imported {path.name}: {report.line(preset.layers)} -> {out}")
    return 0
