"""`python -m sim train-toy out=models/toy-mixtral [steps=N] [seed=0] [batch=8] [seq_len=256] [lr=..]`

Trains the bundled toy MoE (`sim.toy`) on CPU and writes a Hugging Face checkpoint folder
atomically: config.json, generation_config.json, model.safetensors, tokenizer files, README.md
(the model card), train_log.csv and train_config.json. Every training knob of
`sim.toy.train.TrainConfig` is a key (`model.layers=4` etc. for the architecture).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError
from sim.toy.train import LOG_COLUMNS, TrainConfig


@dataclass
class TrainToyArgs(TrainConfig):
    out: str = ""  # output checkpoint folder (required)
    overwrite: bool = False  # replace an existing non-empty `out`
    progress: bool = True  # show a progress bar


def main(argv: list[str]) -> int:
    args = parse_args(TrainToyArgs, argv, allow_config_file=False)
    if not args.out:
        raise UserError("out= is required (the checkpoint folder to write, e.g. out=models/toy-mixtral)")
    out = Path(args.out)
    cfg = TrainConfig(**{k: v for k, v in asdict(args).items() if k not in ("out", "overwrite", "progress")})
    cfg.model = args.model
    cfg.check()

    from sim.toy.card import model_card
    from sim.toy.corpus import load_corpus
    from sim.toy.tokenizer import save_tokenizer
    from sim.toy.train import train

    command = " ".join(["python -m sim train-toy", *argv])
    with atomic.new_dir(out, overwrite=args.overwrite, need_bytes=16e6,
                        replaces=("config.json", "train_config.json")) as tmp:  # claimed before training
        corpus = load_corpus()
        result = train(cfg, corpus, progress=args.progress)
        result.model.save_pretrained(str(tmp))
        save_tokenizer(tmp, model_max_length=cfg.model.context)
        (tmp / "train_log.csv").write_text(log_csv(result.log))
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(result, corpus, command, tmp))
    lo, hi = result.final.usage_range()
    print(
        f"wrote {out}: {cfg.steps} steps in {result.train_seconds:.0f} s, "
        f"held-out {result.final.bits_per_byte:.4f} bits/byte, expert usage min {lo:.3f} max {hi:.3f}"
    )
    return 0


def log_csv(log: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LOG_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in log:
        writer.writerow({k: ("" if v != v else f"{v:.6g}") for k, v in row.items()})  # NaN -> empty
    return buf.getvalue()
