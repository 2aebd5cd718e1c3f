"""Seeded, reproducible CPU training of the toy MoE.

Recipe: random windows of `seq_len` bytes from the training stream (`batch` of them per step, drawn
by `numpy.random.default_rng(seed)`), next-byte cross-entropy, AdamW (betas 0.9/0.95, weight decay
on matrices only), linear warmup then cosine decay to `min_lr_ratio * lr`, gradient clipping.

Load balancing: our own Switch-Transformer auxiliary loss, computed *per MoE layer* and averaged
over layers (`balance_loss`), added with weight `aux_coef`. (Transformers' built-in Mixtral loss
pools the token counts of all layers before multiplying, so one layer can collapse while another
compensates; per-layer balance is what an offloading cache sees, so that is what we penalise.)

Every `log_every` steps a row goes to the log (mean train loss over those steps); every
`eval_every` steps (and at the first and last step) held-out bits per byte are measured on a fixed
set of `eval_windows` windows. Same config + seed + corpus + thread count -> same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sim.errors import UserError
from sim.toy.corpus import Corpus
from sim.toy.evaluate import EvalResult, eval_windows, evaluate
from sim.toy.model import ToyModelConfig, build_model, count_parameters


@dataclass
class TrainConfig:
    steps: int = 1700
    seed: int = 0
    batch: int = 8  # windows per step
    seq_len: int = 256  # bytes per window (batch x seq_len = 2,048 tokens per step)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.01  # weight of the per-layer load-balancing loss
    log_every: int = 50
    eval_every: int = 200
    eval_windows: int = 64  # held-out windows per periodic evaluation
    final_eval_windows: int = 0  # held-out windows for the final evaluation; 0 = all of them
    threads: int = 2  # torch.set_num_threads
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def check(self) -> None:
        """Raise UserError for a value that cannot work."""
        self.model.check()
        if self.final_eval_windows < 0:
            raise UserError(f"final_eval_windows must be >= 0 (0 = all), got {self.final_eval_windows}")
        for name in ("steps", "batch", "seq_len", "log_every", "eval_every", "eval_windows", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UserError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len > self.model.context:
            raise UserError(f"seq_len={self.seq_len} exceeds model.context={self.model.context}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.aux_coef < 0:
            raise UserError("warmup, weight_decay and aux_coef must be >= 0 and grad_clip > 0")


@dataclass
class TrainResult:
    model: Any  # the trained MixtralForCausalLM (float32, eval mode)
    config: TrainConfig
    log: list[dict[str, float]]  # one row per log point (see `LOG_COLUMNS`)
    final: EvalResult  # on the whole held-out stream, with per-layer expert usage
    train_seconds: float  # the optimisation loop, without the final evaluation
    parameters: int


LOG_COLUMNS = ("step", "lr", "train_loss", "train_bpb", "aux_loss", "heldout_bpb", "elapsed_s")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of `cfg.lr` for optimiser step `step` (0-based): warmup, then cosine."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def balance_loss(router_logits: tuple[Any, ...], top_k: int) -> Any:
    """Per-layer Switch load-balancing loss, averaged over layers; 1.0 when perfectly uniform.

    For a layer with router probabilities p [N, E]: f_e = share of the N*top_k assignments that went
    to expert e (no gradient), P_e = mean p[:, e]; loss = E * sum_e f_e * P_e.
    """
    import torch.nn.functional as F

    losses = []
    for logits in router_logits:  # [N, E] per layer
        probs = logits.float().softmax(dim=-1)  # [N, E]
        experts = probs.size(-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        share = F.one_hot(chosen, experts).sum(dim=(0, 1)).float() / chosen.numel()  # [E]
        losses.append(experts * (share * probs.mean(dim=0)).sum())
    return sum(losses) / len(losses)


def _optimizer(model: Any, cfg: TrainConfig) -> Any:
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train(cfg: TrainConfig, corpus: Corpus, progress: bool = True) -> TrainResult:
    """Train a toy model from scratch on `corpus` (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg.check()
    if len(corpus.train) <= cfg.seq_len or len(corpus.heldout) < cfg.seq_len:
        raise UserError(f"corpus too small for seq_len={cfg.seq_len}")
    torch.set_num_threads(cfg.threads)
    model = build_model(cfg.model, cfg.seed, cfg.aux_coef)
    model.train()
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    rng = np.random.default_rng(cfg.seed)
    stream = np.frombuffer(corpus.train, dtype=np.uint8)
    held = eval_windows(corpus.heldout, cfg.seq_len, cfg.eval_windows)
    top_k = cfg.model.top_k

    log: list[dict[str, float]] = []
    t0 = time.perf_counter()
    last_bpb = evaluate(model, held).bits_per_byte
    log.append(_row(0, 0.0, math.nan, math.nan, last_bpb, t0))
    sum_ce = sum_aux = 0.0
    seen = 0
    bar = tqdm(range(1, cfg.steps + 1), desc="train-toy", unit="step", disable=not progress)
    for step in bar:
        starts = rng.integers(0, len(stream) - cfg.seq_len, size=cfg.batch)
        ids = torch.from_numpy(
            np.stack([stream[s : s + cfg.seq_len] for s in starts]).astype(np.int64)
        )  # [B, T]
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1]  # [B, T-1, V]: position t predicts byte t+1
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        aux = balance_loss(out.router_logits, top_k)
        loss = ce + cfg.aux_coef * aux
        if not torch.isfinite(loss):
            raise UserError(f"training diverged: loss is {loss.item()} at step {step}; try a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        sum_ce, sum_aux, seen = sum_ce + ce.item(), sum_aux + aux.item(), seen + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            bpb = evaluate(model, held).bits_per_byte if evaluate_now else math.nan
            log.append(_row(step, lr, sum_ce / seen, sum_aux / seen, bpb, t0))
            last_bpb = bpb if evaluate_now else last_bpb
            bar.set_postfix(loss=f"{sum_ce / seen:.3f}", heldout_bpb=f"{last_bpb:.3f}")
            sum_ce = sum_aux = 0.0
            seen = 0
    train_seconds = time.perf_counter() - t0
    model.eval()
    final_windows = eval_windows(corpus.heldout, cfg.seq_len, cfg.final_eval_windows or None)
    final = evaluate(model, final_windows, usage=True)
    return TrainResult(model, cfg, log, final, train_seconds, count_parameters(model))


def _row(step: int, lr: float, ce: float, aux: float, bpb: float, t0: float) -> dict[str, float]:
    return {
        "step": step,
        "lr": lr,
        "train_loss": ce,  # nats per byte, mean over the steps since the previous row
        "train_bpb": ce / math.log(2),
        "aux_loss": aux,
        "heldout_bpb": bpb,
        "elapsed_s": time.perf_counter() - t0,
    }


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
