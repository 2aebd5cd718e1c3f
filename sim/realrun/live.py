"""Live-model mode: a checkpoint's real forward pass with its experts served from the store.

Held-out text is cut into `seqs` windows of `seq_len` tokens, fed one token per forward with the
KV cache (batch-1 decode, teacher-forced). Three passes over the same tokens:
  0. plain: the unmodified transformers model (its own top-k routing) -> NLL of top-k, and
     (when the gating needs it) S_l by the tracer's Fisher pass over the same windows;
  1. reference: the same model, whose routers hand the experts the gating policy's decision for
     that row (computed live from the router's output, one row at a time); it records the trace
     of what the gated model routes (router logits, ids, weights, pre-gating logits);
  2. offloaded: the experts' weights leave the model for the store (disk or host memory); each
     MoE block's experts module is replaced by the engine's step (`sim.engine.step.decode_layer`)
     on the real machine (`sim/realrun/machine.py`), with the simulator's engine and policy objects
     built on pass 1's trace (so their decisions are exactly pass 1's), loading,
     prefetching and evicting real slots; the output sums the experts by expert id, as
     transformers' eager experts loop does.
Pass 2's logits must equal pass 1's bit for bit (and, under `topk`, pass 0's), whatever the
prefetch and cache policies do: prefetching changes when weights arrive, never what is computed.
Perplexity per gating policy and the measured loss change are reported beside the estimated dL.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from policies.base import Context
from policies.registry import GATING
from sim import bundled
from sim.config import RunConfig, split_knobs
from sim.engine.cache import ExpertCache
from sim.engine.step import Tally, decode_layer
from sim.errors import UserError
from sim.machine.hardware import load_profile
from sim.machine.models import ModelPreset
from sim.realrun.backend import Backend
from sim.realrun.build import RealOptions, register_preset, store_folder, tier_for
from sim.realrun.compute import CpuWorker, SlotPool
from sim.realrun.machine import RealMachine
from sim.realrun.store import HostStore, Layout, open_disk_store
from sim.runner import RunResult, build_engine
from sim.trace.format import ModelInfo, Trace

DEFAULT_MODEL = bundled.models() / "toy-mixtral"  # the checkout's, or the copy a wheel ships
ROW0 = torch.zeros(1, dtype=torch.long)
PREGATE_DEPTH = 2


@dataclass
class LiveResult:
    run: RunResult  # the offloaded pass: engine counters and timings, as a realrun
    logits: torch.Tensor  # [T, V] offloaded pass
    reference_logits: torch.Tensor  # [T, V] pass 1 (plain model under the same gating)
    plain_logits: torch.Tensor  # [T, V] pass 0 (plain model, its own top-k)
    metrics: dict[str, Any]


class LiveKernels:
    """Expert compute on the live hidden state, op for op as transformers' eager experts loop."""

    def __init__(self, act):
        self.act = act
        self.x: torch.Tensor | None = None  # [1, H] the MoE input of the current layer

    def expert(self, mats, weight, tokens=1, wait=lambda i: None) -> torch.Tensor:
        wait(1)
        gate, up = F.linear(self.x, mats[0]).chunk(2, dim=-1)
        h = self.act(gate) * up
        wait(2)
        # a fill on the device, not a tensor from a Python list (a synchronous host copy on CUDA)
        return F.linear(h, mats[1]) * torch.full((1, 1), weight, dtype=torch.float32, device=self.x.device)

    def cpu_expert(self, mats, weight) -> torch.Tensor:
        x = self.x.cpu()
        gate, up = F.linear(x, mats[0]).chunk(2, dim=-1)
        y = F.linear(self.act(gate) * up, mats[1]) * torch.tensor([[weight]], dtype=torch.float32)
        return y.to(self.x.device)

    def attention(self, layer: int, context: int, new: int = 1) -> None:
        """The live model runs its own attention, outside the expert step."""

    def combine(self, outs: dict[int, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(self.x)
        idx = torch.zeros(1, dtype=torch.long, device=self.x.device)
        for key in sorted(outs):  # ascending expert id, as the eager loop adds them
            out.index_add_(0, idx, outs[key].to(out.dtype))
        return out


# ------------------------------------------------------------------ inputs
def heldout_windows(tokenizer, opts: RealOptions) -> np.ndarray:
    """[seqs, seq_len] token ids of held-out text, windows spread evenly over it."""
    if opts.text:
        path = Path(opts.text)
        if not path.is_file():
            raise UserError(f"text file not found: {opts.text}")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        try:
            from sim.toy.corpus import load_corpus
        except ImportError:
            raise UserError("no held-out text: give text=FILE") from None
        text = load_corpus().heldout[:2_000_000].decode("utf-8", errors="replace")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n, S = opts.seqs, opts.seq_len
    if n < 1 or S < 2:
        raise UserError("live mode needs seqs >= 1 and seq_len >= 2")
    whole = len(ids) // S
    if whole < n:
        raise UserError(f"the held-out text has {len(ids)} tokens: fewer than seqs x seq_len = {n * S}")
    pick = np.linspace(0, whole - 1, n).round().astype(np.int64)
    return ids[: whole * S].reshape(whole, S)[pick]


def live_preset(loaded) -> ModelPreset:
    cfg = loaded.config
    first = loaded.layers[0]
    heads = int(cfg.num_attention_heads)
    return ModelPreset(
        name=f"live:{loaded.name}", layers=len(loaded.layers), experts=int(first.router.num_experts),
        top_k=int(first.router.top_k), hidden=int(cfg.hidden_size), expert_width=int(first.experts.intermediate_dim),
        heads=heads, kv_heads=int(getattr(cfg, "num_key_value_heads", heads)),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads), vocab=int(cfg.vocab_size),
        bits=32, attn_bits=32, source=f"checkpoint {loaded.name} (live mode)")


def check_model(loaded) -> None:
    if loaded.config.model_type != "mixtral":
        raise UserError(f"live mode runs Mixtral-architecture checkpoints; {loaded.name} is "
                        f"{loaded.config.model_type!r}")
    ex = loaded.layers[0].experts
    if not (hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj")):
        raise UserError(f"{loaded.name}: experts module without fused gate_up_proj / down_proj weights")


# ------------------------------------------------------------------ passes
def decode_pass(loaded, windows: np.ndarray, before=None, after=None) -> torch.Tensor:
    """Feed every window one token at a time with the KV cache; returns logits [T, V] (float32)."""
    from transformers import DynamicCache

    from sim.tracer.core import cache_kwarg

    model, kw = loaded.model, cache_kwarg(loaded.model)
    dev = loaded.input_device
    out = []
    t = 0
    with torch.no_grad():
        for row in windows:
            cache = DynamicCache(config=model.config)
            for tok in row:
                if before is not None:
                    before(t)
                o = model(input_ids=torch.tensor([[int(tok)]], device=dev), use_cache=True, **{kw: cache})
                out.append(o.logits[0, -1].float().cpu())
                if after is not None:
                    after(t)
                t += 1
    return torch.stack(out)


def nll_sum(logits: torch.Tensor, windows: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL (nats) within each window, and the number of scored tokens."""
    S = windows.shape[1]
    lp = torch.log_softmax(logits.double(), dim=-1).reshape(len(windows), S, -1)
    tgt = torch.as_tensor(windows[:, 1:])
    nll = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
    return float(nll.sum()), int(nll.numel())


def sensitivities(loaded, windows: np.ndarray) -> np.ndarray:
    """S_l by the tracer's Fisher pass (top-k routing) over the windows."""
    from sim.tracer.capture import Capture
    from sim.tracer.core import BatchResult, fisher_pass

    tok = torch.as_tensor(windows)
    with torch.no_grad(), Capture(loaded.family, loaded.layers, record=True) as cap:
        loaded.model(input_ids=tok.to(loaded.input_device), use_cache=False)
        ids = np.stack([cap.routes[i][2].cpu().numpy() for i in range(len(loaded.layers))], axis=2)
    tgt = np.concatenate([windows[:, 1:], windows[:, -1:]], axis=1)
    res = BatchResult(tokens=windows, targets=tgt, logits=None, experts=ids, weights=None, pregate={})
    fisher_pass(loaded, res)
    return res.fisher.reshape(-1, len(loaded.layers)).mean(axis=0)


class GatedRouters:
    """Router wrappers: each MoE block gets the gating policy's decision for the current row."""

    def __init__(self, loaded, T: int):
        self.loaded, self.layers = loaded, loaded.layers
        L, E, k = len(self.layers), int(self.layers[0].router.num_experts), int(self.layers[0].router.top_k)
        self.L, self.E, self.k = L, E, k
        self.logits = np.zeros((T, L, E), np.float32)
        self.ids = np.zeros((T, L, k), np.int16)
        self.weights = np.zeros((T, L, k), np.float32)
        self.pregate = {d: np.zeros((T, L, E), np.float32) for d in range(1, PREGATE_DEPTH + 1)}
        self.decided_ids = np.zeros((T, L, k), np.int64)
        self.decided_w = np.zeros((T, L, k), np.float64)
        self.t = 0
        self.decide = None  # (t, layer) -> (ids, weights): set per pass
        self._orig = [layer.router.forward for layer in self.layers]

    def install(self) -> None:
        for layer in self.layers:
            layer.router.forward = self._wrap(layer.index)

    def remove(self) -> None:
        for layer, f in zip(self.layers, self._orig, strict=True):
            layer.router.forward = f

    def _wrap(self, i: int):
        orig = self._orig[i]

        def forward(hidden):
            logits, w, ids = orig(hidden)
            t = self.t
            wf, order = torch.sort(w.detach().float(), dim=-1, descending=True, stable=True)
            self.logits[t, i] = logits[0].float().cpu().numpy()
            self.ids[t, i] = ids[0].gather(-1, order[0]).cpu().numpy()
            self.weights[t, i] = wf[0].cpu().numpy()
            x = hidden.reshape(-1, hidden.shape[-1])
            for d in self.pregate:
                if i + d < self.L:
                    nxt = self._orig[i + d](x)[0]
                    self.pregate[d][t, i] = nxt[0].float().cpu().numpy()
            new_ids, new_w = self.decide(t, i)
            self.decided_ids[t, i], self.decided_w[t, i] = new_ids, new_w
            run = torch.as_tensor(np.where(new_ids >= 0, new_ids, self.E)[None], device=ids.device)
            return logits, torch.as_tensor(np.asarray(new_w, np.float32)[None], device=w.device), run

        return forward


class RowGating:
    """The gating policy applied to one row at a time, as the live router produces it.

    A fresh instance of the configured (stateless) gating policy on a one-token trace whose row
    is overwritten before each call; `plan()` then answers for that row."""

    def __init__(self, cfg: RunConfig, preset: ModelPreset, info: ModelInfo, S: np.ndarray | None,
                 routers: GatedRouters):
        L, k = info.layers, info.top_k
        self.routers = routers
        self.row = Trace(model=info, seq=np.zeros(1, np.int32), pos=np.zeros(1, np.int32),
                         is_decode=np.ones(1, bool), experts=np.tile(np.arange(k, dtype=np.int16), (1, L, 1)),
                         weights=np.full((1, L, k), 1.0 / k, np.float32), logits=np.zeros((1, L, info.experts), np.float32),
                         sensitivity=S)
        ctx = Context(trace=self.row, preset=preset, cache=ExpertCache(L, info.experts, 0.0),
                      capacity_slots=L * info.experts, rng=np.random.default_rng(cfg.seed))
        name, knobs = split_knobs(cfg.gating)
        self.policy = GATING.get(name)(GATING.knobs(name, knobs), ctx)
        if self.policy.plan() is None:
            raise UserError(f"live mode needs a stateless gating policy (topk, adapmoe, top_p); {name!r} "
                            "decides from the cache state")

    def __call__(self, t: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.routers
        self.row.experts[0, layer] = r.ids[t, layer]
        self.row.weights[0, layer] = r.weights[t, layer]
        self.row.logits[0, layer] = r.logits[t, layer]
        plan = self.policy.plan()
        return plan.ids[0, layer], plan.weights[0, layer]


def gating_needs_sensitivity(cfg: RunConfig) -> bool:
    name, knobs = split_knobs(cfg.gating)
    return knobs.get("sensitivity", "trace") == "trace" and name not in ("topk", "top_p")


def fill_id(folder: Path) -> str:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).glob("*.safetensors"))]
    return f"checkpoint {Path(folder).resolve().name} {stats}"


def live_run(cfg: RunConfig, opts: RealOptions) -> LiveResult:
    from sim.realrun.run import result_of
    from sim.tracer.loader import load

    backend = Backend(opts.device, opts.threads, opts.pin)
    loaded = load(cfg.model, dtype="float32", device=opts.device)
    check_model(loaded)
    hw = tier_for(load_profile(cfg.hw), opts.store)
    windows = heldout_windows(loaded.tokenizer, opts)
    T = windows.size
    preset = live_preset(loaded)
    # pass 0: the plain model
    plain = decode_pass(loaded, windows)
    S = sensitivities(loaded, windows) if gating_needs_sensitivity(cfg) else None
    # pass 1: the plain model under the gating policy, recording the gated routing
    for layer in loaded.layers:
        layer.experts.config._experts_implementation = "eager"  # dropped experts are index E
    info = ModelInfo(name=loaded.name, layers=preset.layers, experts=preset.experts, top_k=preset.top_k,
                     hidden=preset.hidden, expert_width=preset.expert_width,
                     moe_layer_ids=tuple(x.decoder_index for x in loaded.layers), dtype="float32")
    routers = GatedRouters(loaded, T)
    routers.decide = RowGating(cfg, preset, info, S, routers)
    routers.install()

    def at(t: int) -> None:
        routers.t = t

    reference = decode_pass(loaded, windows, before=at)
    trace = Trace(model=info, seq=np.repeat(np.arange(len(windows), dtype=np.int32), windows.shape[1]),
                  pos=np.tile(np.arange(windows.shape[1], dtype=np.int32), len(windows)),
                  is_decode=np.ones(T, bool), experts=routers.ids.copy(), weights=routers.weights.copy(),
                  logits=routers.logits.copy(), pregate={d: a.copy() for d, a in routers.pregate.items()},
                  token_id=windows.reshape(-1).astype(np.int32), sensitivity=S,
                  sensitivity_info={"definition": "tracer Fisher pass over the live windows"} if S is not None else {},
                  source={"tool": "moe-offload-sim realrun (live)", "checkpoint": loaded.name})
    cfg2 = dataclasses.replace(cfg, model=register_preset(preset), quant=type(cfg.quant)())
    sim_engine, binfo = build_engine(cfg2, trace, hw)
    from sim.realrun.run import refuse_reserved, refuse_tiers

    refuse_reserved(sim_engine.placement)
    refuse_tiers(sim_engine)
    plan = sim_engine.plan
    if plan is None or not (np.array_equal(np.asarray(plan.ids), routers.decided_ids)
                            and np.array_equal(np.asarray(plan.weights), routers.decided_w)):
        raise RuntimeError("the gating plan on the recorded trace differs from the per-row decisions")
    # pass 2: offloaded experts
    run, engine, rec = offloaded_pass(cfg2, opts, loaded, backend, sim_engine, binfo, windows, routers)
    res = result_of(cfg2, engine, rec, binfo, hw, preset, {"realrun_device": backend.describe(),
                                                           "realrun_store": engine.machine.store.kind})
    metrics = live_metrics(cfg, windows, plain, reference, run, trace, sim_engine)
    res.summary.update(metrics)
    return LiveResult(res, run, reference, plain, metrics)


def offloaded_pass(cfg, opts, loaded, backend, sim_engine, binfo, windows, routers):
    L, E = len(loaded.layers), int(loaded.layers[0].router.num_experts)
    ex0 = loaded.layers[0].experts
    layout = Layout(L, E, (tuple(ex0.gate_up_proj.shape[1:]), tuple(ex0.down_proj.shape[1:])), "float32")

    def fill(layer: int) -> list[torch.Tensor]:
        ex = loaded.layers[layer].experts
        return [t for e in range(E) for t in (ex.gate_up_proj[e].detach().cpu().clone(),
                                               ex.down_proj[e].detach().cpu().clone())]

    if opts.store == "host":
        store = HostStore(layout, backend, fill)
    else:
        folder = store_folder(opts.store_dir, f"live-{loaded.name}")
        store = open_disk_store(folder, layout, backend, fill, fill_id(Path(loaded.model.name_or_path)),
                                progress=opts.progress)
    placement = sim_engine.placement
    if placement.may_use_cpu and opts.store != "host":
        raise UserError("a placement that computes experts on the CPU needs store=host")
    if placement.low_bytes and not placement.always_load:
        raise UserError(f"live mode checks the offloaded logits equal the reference bit for bit; placement "
                        f"{placement.name!r} computes low-precision copies (use a synthetic realrun for it)")
    for layer in loaded.layers:  # the weights now live only in the store
        layer.experts.gate_up_proj = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        layer.experts.down_proj = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    pool = SlotPool(backend, layout, binfo["cache_slots"] + 2 * sim_engine.opt.staging_buffers)
    kernels = LiveKernels(ex0.act_fn)
    cpu = CpuWorker(backend) if placement.may_use_cpu else None
    engine = sim_engine
    machine = RealMachine(backend, store, pool, kernels, engine.link, channels=opts.channels,
                          chunk_bytes=engine.yield_chunk_bytes, cpu_worker=cpu, pipelining=engine.opt.pipelining)
    engine.set_machine(machine)
    state: dict[str, Any] = {"t": 0, "tally": None}
    plan_ids, plan_w = np.asarray(engine.plan.ids), np.asarray(engine.plan.weights)
    recorded = routers.ids.copy()

    def decide(t: int, i: int):
        if not np.array_equal(routers.ids[t, i], recorded[t, i]):
            raise RuntimeError(f"token {t} layer {i}: the offloaded model routed differently from the reference")
        return plan_ids[t, i], plan_w[t, i]

    routers.decide = decide
    pos = engine.ctx.trace.pos
    row0 = ROW0.to(opts.device)  # once: a per-layer `.to` would be a synchronous copy on CUDA
    for layer in loaded.layers:
        def forward(hidden_states, top_k_index, top_k_weights, i=layer.index):
            kernels.x = hidden_states[row0]  # a gathered copy, as the eager loop takes
            t = state["t"]
            return engine.run_now(decode_layer(engine, t, i, int(pos[t]), t < engine.opt.timeline_tokens,
                                               state["tally"], *engine.decide(t, i)))

        layer.experts.forward = forward

    def before(t: int) -> None:
        routers.t = state["t"] = t
        state["tally"] = Tally()

    def after(t: int) -> None:
        engine.token_end(t, state["tally"])

    try:
        with backend.pinned():
            engine.warm_start()
            logits = decode_pass(loaded, windows, before=before, after=after)
            machine.finish()  # waits for copies still queued, before the workers stop
            rec = engine.finish()
    finally:
        machine.close()
        store.close()
    return logits, engine, rec


def live_metrics(cfg, windows, plain, reference, run, trace, sim_engine) -> dict[str, Any]:
    p_sum, n = nll_sum(plain, windows)
    g_sum, _ = nll_sum(run, windows)
    dL_total = float(np.asarray(sim_engine.plan.dL, dtype=float).sum())
    return {
        "live_gating": split_knobs(cfg.gating)[0],
        "live_gating_knobs": json.dumps(split_knobs(cfg.gating, "gating")[1], sort_keys=True),
        "live_tokens_scored": n,
        "ppl_plain": math.exp(p_sum / n),
        "ppl_gated": math.exp(g_sum / n),
        "nll_plain_per_token": p_sum / n,
        "nll_gated_per_token": g_sum / n,
        "dNLL_measured_total": g_sum - p_sum,
        "dL_est_total": dL_total,
        "logits_identical_to_reference": bool(torch.equal(run, reference)),
        "reference_identical_to_plain": bool(torch.equal(reference, plain)),
        "max_abs_logit_diff_vs_reference": float((run - reference).abs().max()),
    }


LIVE_KEYS = ("live_gating", "live_gating_knobs", "live_tokens_scored", "ppl_plain", "ppl_gated",
             "nll_plain_per_token", "nll_gated_per_token", "dNLL_measured_total", "dL_est_total",
             "logits_identical_to_reference", "reference_identical_to_plain", "max_abs_logit_diff_vs_reference",
             "tpot_mean_s", "hit_rate", "demand_loads_per_token", "prefetch_issued", "prefetch_used",
             "stall_share", "experts_per_token_layer", "single_expert_share")


def write_live(res: LiveResult, opts: RealOptions, out: Path) -> None:
    from sim.realrun.run import write_real_results

    write_real_results(res.run, opts, out, report=False)


def fill_live(res: LiveResult, opts: RealOptions, tmp: Path) -> None:
    """`write_live` into `tmp`, the temporary folder of a claimed output."""
    from sim.realrun.run import fill_real_results

    fill_real_results(res.run, opts, tmp, report=False)


def print_live(res: LiveResult) -> None:
    from sim.results.folder import summary_table

    print(summary_table(res.run.summary, list(LIVE_KEYS)))
