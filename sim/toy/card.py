"""The checkpoint folder's README.md: how the toy model was made and how well it does.

Everything in it is computed by the training run (`sim.toy.train.TrainResult`) except the
"Routing statistics" section, which is filled in later from the bundled trace.
"""

from __future__ import annotations

import math
from pathlib import Path

from sim.toy.corpus import Corpus
from sim.toy.train import TrainResult

ROUTING_PLACEHOLDER = "(filled in from the bundled trace)"


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def loss_table(log: list[dict[str, float]], points: int = 10) -> str:
    """Markdown table of the evaluated log rows, thinned to about `points` rows (first and last kept)."""
    rows = [r for r in log if not math.isnan(r["heldout_bpb"])]
    if len(rows) > points:
        keep = {round(i * (len(rows) - 1) / (points - 1)) for i in range(points)}
        rows = [r for i, r in enumerate(rows) if i in keep]
    lines = [
        "| step | lr | train loss (nats/byte) | train bits/byte | held-out bits/byte | elapsed (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['step'])} | {r['lr']:.2e} | {_fmt(r['train_loss'])} | {_fmt(r['train_bpb'])} "
            f"| {_fmt(r['heldout_bpb'])} | {r['elapsed_s']:.0f} |"
        )
    return "\n".join(lines)


def model_card(result: TrainResult, corpus: Corpus, command: str, folder: Path) -> str:
    """README.md text for the checkpoint written to `folder` by `command`."""
    cfg, m = result.config, result.config.model
    weights = folder / "model.safetensors"
    size = weights.stat().st_size if weights.exists() else 0
    lo, hi = result.final.usage_range()
    uniform = 1 / m.experts  # each layer's shares sum to 1 over its experts
    minutes = result.train_seconds / 60
    return f"""# toy-mixtral: the bundled toy MoE

A tiny byte-level Mixture-of-Experts language model with Mixtral-8x7B's routing shape, trained on
CPU by this project (`sim/toy/`). It is what `python -m sim trace` traces to make the bundled
trace and what the tests load. It is a plain Hugging Face `MixtralForCausalLM` checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("models/toy-mixtral")   # offline, ~{size / 1e6:.1f} MB
tokenizer = AutoTokenizer.from_pretrained("models/toy-mixtral")      # token id == byte value
```

## Shape

| | |
|---|---|
| decoder layers (all MoE) | {m.layers} |
| experts per layer / top-k | {m.experts} / {m.top_k} (softmax over {m.experts} router logits, top-{m.top_k}, renormalised) |
| hidden / expert width | {m.hidden} / {m.intermediate} (SwiGLU experts) |
| attention | {m.heads} query heads, {m.kv_heads} KV heads, head dim {m.head_dim}, RoPE theta {m.rope_theta:g} |
| vocabulary | 256 (one token per byte; no special tokens, no BOS/EOS/PAD) |
| context | {m.context} bytes (`max_position_embeddings`; the training window) |
| parameters | {result.parameters:,} ({m.expert_params:,} in experts) |
| storage | float32 safetensors, `model.safetensors` = {size:,} bytes |

The tokenizer is a real `tokenizers` pipeline built offline (`sim/toy/tokenizer.py`): ByteLevel
pre-tokenizer without regex or prefix space, a BPE vocabulary of the 256 byte characters with no
merges, ByteLevel decoder; `tokenizer(text).input_ids == list(text.encode("utf-8"))`.

## Training

Command (from the repository root; `threads` changes float rounding, so keep it to reproduce):

```
{command}
```

- {cfg.steps} steps of {cfg.batch} x {cfg.seq_len} bytes ({cfg.batch * cfg.seq_len:,} tokens/step,
  {cfg.steps * cfg.batch * cfg.seq_len:,} in all), seed {cfg.seed}, {cfg.threads} CPU thread(s);
  training took {result.train_seconds:.0f} s ({minutes:.1f} min) plus the final evaluation.
- AdamW (betas 0.9/0.95, weight decay {cfg.weight_decay} on matrices), lr {cfg.lr:g} with
  {cfg.warmup} warmup steps then cosine to {cfg.lr * cfg.min_lr_ratio:g}, gradient clip {cfg.grad_clip}.
- Load balancing: our own Switch-Transformer auxiliary loss computed per layer and averaged over
  layers, weight {cfg.aux_coef} (`sim/toy/train.py: balance_loss`; not transformers' built-in
  loss, which pools all layers' counts). `router_aux_loss_coef` in `config.json` records the weight.
- Full log (every {cfg.log_every} steps): `train_log.csv`; all settings: `train_config.json`.

### Corpus

{corpus.describe()}

The standard library differs between Python versions, so a rerun on another version trains on a
different corpus; compare the sha256 values above (`sim/toy/corpus.py: load_corpus`).

### Loss curve

Train loss is the mean over the {cfg.log_every} steps before the row; held-out bits per byte on
{cfg.eval_windows} fixed held-out windows of {cfg.seq_len} bytes.

{loss_table(result.log)}

**Final held-out bits per byte: {result.final.bits_per_byte:.4f}** (all {result.final.bytes_scored:,}
predicted bytes of the held-out stream, in windows of {cfg.seq_len}; a uniform guess is 8.0).

Expert usage on that held-out text (share of each layer's top-{m.top_k} assignments per expert;
uniform = {uniform:.3f}): min {lo:.3f}, max {hi:.3f} over all {m.layers} x {m.experts} (layer, expert) pairs.

## Routing statistics

{ROUTING_PLACEHOLDER}
"""
