"""`python -m sim fisher-check model=DIR text=FILE [samples=N] [seed=0] [out=FILE.json] [figure=FILE.html]`

Validates the tracer's Fisher sensitivities: traces the text (prefill + greedy decode, Fisher
pass), samples (token, layer) pairs, really drops the second (lowest-ranked) expert at each one,
re-runs the forward pass, and compares the measured change of the summed NLL with the estimates
`1/2 * w2^2 * fisher` (second order), `w2 * g.(E1-E2)` (first order) and their sum; per layer
with `1/2 * mean(w2^2) * S_l`. See `sim.tracer.fisher_check` and `docs/tracer.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError


@dataclass
class FisherCheckArgs:
    model: str = ""  # local checkpoint folder (required)
    text: str = ""  # UTF-8 text file the prompts are cut from (required)
    samples: int = 256  # (token, layer) pairs, spread evenly over the layers
    seed: int = 0  # chooses the pairs
    out: str = ""  # JSON with every figure (optional)
    figure: str = ""  # plotly HTML (optional)
    prompts: int = 2  # prompts cut from the text
    prompt_tokens: int = 64  # tokens per prompt (prefilled)
    decode_tokens: int = 16  # greedy decode steps per prompt
    dtype: str = "float64"  # float64 keeps rounding far below the measured changes
    device: str = "cpu"
    batch: int = 16  # perturbations per forward (batch rows of one sequence)
    progress: bool = True


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    import contextlib

    args = parse_args(FisherCheckArgs, argv)
    for key in ("model", "text"):
        if not getattr(args, key):
            raise UserError(f"{key}= is required (python -m sim fisher-check model=DIR text=FILE)")
    for key in ("samples", "prompts", "prompt_tokens", "batch"):
        if getattr(args, key) < 1:
            raise UserError(f"{key} must be >= 1, got {getattr(args, key)}")
    if args.decode_tokens < 0:
        raise UserError(f"decode_tokens must be >= 0, got {args.decode_tokens}")
    with contextlib.ExitStack() as claims:  # out= and figure= are checked and claimed before the work
        for key in ("out", "figure"):
            p = Path(getattr(args, key)) if getattr(args, key) else None
            if p is not None:
                if p.is_dir() or not p.parent.is_dir():
                    raise UserError(f"{key}={p}: not a file path in an existing folder")
                claims.enter_context(atomic.claim_file(p, what=f"{key} file"))
        return _main(args, argv)


def _main(args: FisherCheckArgs, argv: list[str]) -> int:

    import numpy as np
    from tqdm import tqdm

    from sim.tracer import build, fisher_check, loader, prompts

    loaded = loader.load(args.model, dtype=args.dtype, device=args.device)
    if loaded.family.top_k(loaded.layers[0]) < 2:
        raise UserError(f"{loaded.name}: top_k = 1, there is no second expert to drop")
    loader.check_length(loaded, args.prompt_tokens + args.decode_tokens)
    ps = prompts.make_prompts(
        loaded.tokenizer, args.text, prompts=args.prompts, prompt_tokens=args.prompt_tokens
    )
    results = build.run(
        loaded,
        ps,
        decode_tokens=args.decode_tokens,
        pregate_depth=0,
        fisher=True,
        batch=args.batch,
        seed=args.seed,
        progress=args.progress,
    )
    flat = fisher_check.Flat.of(results)
    pairs = fisher_check.sample_pairs(flat.fisher.shape, args.samples, np.random.default_rng(args.seed))
    with tqdm(total=len(pairs), desc="drop e2", unit="pair", disable=None if args.progress else True) as bar:
        measured = fisher_check.measure(loaded, flat, pairs, batch=args.batch, step=bar.update)
    report = fisher_check.analyse(flat, pairs, measured)
    report = {
        "model": loaded.name,
        "text": ps.text_name,
        "text_sha256": ps.text_sha256,
        "dtype": args.dtype,
        "seed": args.seed,
        "samples": int(len(pairs)),
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "loss": build.LOSS_DEFINITION,
        "fisher": build.FISHER_DEFINITION,
        "sequences": [
            {"tokens": flat.tokens[i].tolist(), "targets": flat.targets[i].tolist()}
            for i in range(flat.tokens.shape[0])
        ],
        **report,
    }
    _print(report)
    if args.out:
        atomic.write_text(Path(args.out), json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.figure:
        title = f"Fisher check: {loaded.name} on {ps.text_name} ({len(pairs)} pairs)"
        atomic.write_text(Path(args.figure), fisher_check.figure_html(report, title))
        print(f"wrote {args.figure}")
    return 0


def _print(r: dict) -> None:
    head = f"{'layer':>5} {'S_l':>10} {'mean w2^2':>10} {'predicted':>11} {'measured':>11} {'|measured|':>11} {'pairs':>6}"
    print(head)
    for row in r["layers"]:
        print(
            f"{row['layer']:>5} {row['S_l']:>10.4g} {row['mean_w2_sq']:>10.4f} {row['predicted_mean']:>11.4g} "
            f"{_fmt(row['measured_mean'], '.4g'):>11} {_fmt(row['measured_abs_mean'], '.4g'):>11} {row['pairs']:>6}"
        )
    pl, pp = r["per_layer"], r["per_pair"]
    print(f"per layer ({pl['layers']} layers), Spearman with the mean measured change:")
    print(f"  predicted = 1/2 mean(w2^2) S_l      {_fmt(pl['spearman'])}")
    print(f"  predicted vs mean |measured|        {_fmt(pl['abs']['spearman'])}")
    print(f"  mean(first + second) on the pairs   {_fmt(pl['taylor']['spearman'])}")
    print(
        f"per pair ({pp['pairs']} pairs)             Pearson   Spearman   mean (measured {pp['means']['measured']:.4g})"
    )
    rows = (
        ("second_order", "1/2 w2^2 fisher", "second_order"),
        ("first_order", "w2 g.(E1-E2)", "first_order"),
        ("both", "sum of both", "both"),
        ("second_order_abs", "1/2 w2^2 fisher vs |dL|", "measured_abs"),
    )
    for key, name, mean in rows:
        c = pp[key]
        print(f"  {name:<27} {_fmt(c['pearson']):>9} {_fmt(c['spearman']):>10}   {pp['means'][mean]:.4g}")
