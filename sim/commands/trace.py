"""`python -m sim trace model=DIR text=FILE out=DIR [...]`: trace a live MoE checkpoint.

Loads a local Hugging Face MoE checkpoint, splits the text into `prompts` prompts of
`prompt_tokens` tokens, prefills each and greedily decodes `decode_tokens` tokens with the KV
cache, and records per (sequence, position, MoE layer) the router logits, the top-k ids and
weights as routed, pre-gating logits for `pregate_depth` layers ahead, and Fisher sensitivities.
What exactly is computed: `docs/tracer.md`. Torch is imported only when the command runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError


@dataclass
class TraceArgs:
    model: str = ""  # local checkpoint folder (config.json, weights, tokenizer), or its config.json
    text: str = ""  # UTF-8 text file the prompts are cut from
    out: str = ""  # output trace folder (must not exist, or be empty, unless overwrite)
    device: str = "cpu"  # cpu | cuda | cuda:N
    device_map: str = ""  # "auto": spread over the visible GPUs with accelerate
    dtype: str = "float32"  # float32 | bfloat16 | float16 (| float64)
    pregate_depth: int = 2  # pregate_1..D columns
    decode_tokens: int = 32  # greedy decode steps per prompt
    prompt_tokens: int = 128
    prompts: int = 8
    batch: int = 8  # prompts per forward (equal lengths, no padding)
    fisher: bool = True  # compute Fisher sensitivities (one backward per batch)
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def check(args: TraceArgs) -> None:
    """Cheap checks before anything is loaded."""
    for key in ("model", "text", "out"):
        if not getattr(args, key):
            raise UserError(f"{key}= is required (python -m sim trace model=DIR text=FILE out=DIR)")
    check_checkpoint(args)
    if not Path(args.text).is_file():
        raise UserError(f"text file not found: {args.text}")
    for key, low in (
        ("pregate_depth", 0),
        ("decode_tokens", 0),
        ("prompt_tokens", 1),
        ("prompts", 1),
        ("batch", 1),
    ):
        if getattr(args, key) < low:
            raise UserError(f"{key} must be >= {low}, got {getattr(args, key)}")
    atomic.check_new_dir(Path(args.out), overwrite=args.overwrite)
    check_family(args)


def check_checkpoint(args: TraceArgs) -> None:
    """`model=` of `trace` is a checkpoint folder (or its config.json: the folder it is in). A
    preset or a model YAML file has sizes but no weights to run: refused, saying so."""
    from sim.machine.models import PRESETS

    path = Path(args.model)
    if path.is_file() and path.name == "config.json":
        args.model = str(path.parent)
        path = path.parent
    if not path.is_dir():
        if args.model in PRESETS or path.suffix.lower() in (".yaml", ".yml"):
            raise UserError(f"trace runs a checkpoint: model= is a folder with config.json, weights and a "
                            f"tokenizer; {args.model} is a model preset or a model file (sizes, no weights)")
        raise UserError(f"model folder not found: {args.model}")


def check_family(args: TraceArgs) -> None:
    """An unsupported `model_type` in the checkpoint's config.json: refused (the error names it)
    before torch is imported. A folder without config.json is the loader's to report."""
    from sim.machine.model_source import config_json_fields

    config = Path(args.model) / "config.json"
    if config.is_file():
        config_json_fields(config)


def main(argv: list[str]) -> int:
    args = parse_args(TraceArgs, argv)
    check(args)
    # the output is claimed before the checkpoint is loaded: a second trace to it fails at once
    with atomic.new_dir(Path(args.out), overwrite=args.overwrite, need_bytes=16e6,
                        replaces=("meta.yaml", "routing.parquet")) as tmp:  # overwrite= replaces a trace only
        trace = _trace(args)
        from sim.trace.format import fill_trace

        fill_trace(trace, tmp)
    m = trace.model
    s_l = (
        ""
        if trace.sensitivity is None
        else f"; S_l from {trace.sensitivity.max():.3g} to {trace.sensitivity.min():.3g}"
    )
    print(
        f"wrote {args.out}: {trace.num_tokens} tokens ({trace.num_decode} decode) x {m.layers} MoE layers, "
        f"{m.experts} experts, top-{m.top_k}, routing {m.routing}{s_l}; {trace.checksum()}"
    )
    return 0


def _trace(args: TraceArgs):
    from sim.tracer import build, loader, prompts

    loaded = loader.load(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    loader.check_length(loaded, args.prompt_tokens + args.decode_tokens)
    ps = prompts.make_prompts(
        loaded.tokenizer, args.text, prompts=args.prompts, prompt_tokens=args.prompt_tokens
    )
    depth = min(args.pregate_depth, len(loaded.layers) - 1)
    results = build.run(
        loaded,
        ps,
        decode_tokens=args.decode_tokens,
        pregate_depth=depth,
        fisher=args.fisher,
        batch=args.batch,
        seed=args.seed,
        progress=args.progress,
    )
    extra = {
        "device": args.device if not args.device_map else f"device_map={args.device_map}",
        "batch": args.batch,
    }
    if depth != args.pregate_depth:
        extra["pregate_depth_requested"] = args.pregate_depth
    return build.assemble(
        loaded,
        ps,
        results,
        decode_tokens=args.decode_tokens,
        pregate_depth=depth,
        seed=args.seed,
        extra_source=extra,
    )
