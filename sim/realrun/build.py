"""Configuration of a real run: `RunConfig` (as `run`) plus the backend's own keys.

`python -m sim realrun device=cpu store=disk layers=8 tokens=32 policy=adapmoe cache.slots=64`:
the keys of `RealOptions` are taken out first, every other key is a `run` key validated by
`parse_run_config`. Policies are built by the simulator's own `sim.runner.build_engine`, so a
real run and a simulated run of one config use the very same policy classes, knobs and checks
(trace/preset mismatch, a cache smaller than one layer's top-k, staging buffers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sim import bundled
from sim.args import parse_args, split_pairs
from sim.config import RunConfig, parse_run_config
from sim.errors import UserError
from sim.machine.models import PRESETS, ModelPreset
from sim.trace.format import ModelInfo, Trace

STORES = ("disk", "host")


@dataclass
class RealOptions:
    device: str = "cpu"  # cpu | cuda
    store: str = "disk"  # disk (safetensors, page cache dropped) | host (host memory; pinned on CUDA)
    layers: int = 0  # replay only the first N MoE layers (0: all)
    tokens: int = 64  # decode at most N tokens (0: all; engine.max_tokens= is kept when tokens= is not given)
    store_dir: str = ""  # where store=disk keeps its stores, one folder per shape (default: the user cache folder)
    threads: int = 1  # compute threads (CPU); 1 leaves a core to the copy worker
    channels: int = 1  # copy workers (a link's channels)
    pin: bool = True  # main thread and workers on separate CPUs (when there are two or more)
    weights_seed: int = 0  # random expert weights (synthetic runs)
    progress: bool = True  # show a progress bar on stderr
    # live-model mode (model=DIR of a checkpoint; live=true: the bundled toy model unless model= is a folder)
    live: bool = False  # run the live model (model=DIR, else the bundled toy model) and measure its perplexity
    text: str = ""  # held-out text file (default: the toy corpus's held-out split)
    seqs: int = 4  # windows of held-out text
    seq_len: int = 64  # tokens per window (teacher-forced, one token per forward, KV cache)
    reference: bool = True  # also run the plain transformers model and compare logits bit for bit


OWN_KEYS = {f.name for f in dataclasses.fields(RealOptions)}

#: the model a real run replays the bundled toy trace as, without `model=` (neither a pair nor in a
#: `config=` file): a float preset with the trace's routing shape (Mixtral-8x7B's), small enough for
#: a CPU; `run` replays that trace as mixtral-8x7b, whose 2-bit experts a real run cannot compute with.
#: Any other trace without `model=` is replayed as its own model, as in `run`.
DEFAULT_MODEL = "mixtral-mini"
#: this machine's calibrated profile (`python -m sim calibrate`), used when `hw=` is not given:
#: `./hwprofiles/local.yaml` of the working folder, else the one in the bundled hwprofiles/
LOCAL_PROFILE = "hwprofiles/local.yaml"


def local_profile() -> Path | None:
    """The calibrated profile `hw=hwprofiles/local.yaml` resolves to, if there is one (`sim.paths`:
    the working folder's hwprofiles/ first, then the bundled one)."""
    for path in (Path(LOCAL_PROFILE), bundled.hwprofiles() / "local.yaml"):
        if path.is_file():
            return path
    return None


def _given(pairs: list[str]) -> dict[str, str]:
    """The run keys the user gave: the `config=` files' top-level keys, the pairs on top (a file
    that does not read is skipped here; the run's own parse reports it)."""
    import yaml

    files: dict[str, str] = {}
    own: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "config":
            try:
                data = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                files.update({str(k): str(v) for k, v in data.items()})
        else:
            own[key] = value
    return {**files, **own}


def _replays_bundled_toy_as_default(pairs: list[str]) -> bool:
    """No model given (`model=`, `model.FIELD=`) and the trace is the bundled `traces/toy`."""
    given = _given(pairs)
    if any(k == "model" or k.startswith("model.") or k == "model_overrides" for k in given):
        return False
    from sim.runner import resolve_trace_path

    try:
        trace = resolve_trace_path(given.get("trace", RunConfig().trace)).resolve()
    except (UserError, OSError):
        return False  # the run's own parse reports a trace that is not there
    return trace == (bundled.traces() / "toy").resolve()


def parse_realrun(argv: list[str]) -> tuple[RunConfig, RealOptions]:
    """Split `key=value` pairs into RealOptions and a resolved RunConfig."""
    pairs = split_pairs(argv)
    own = [p for p in pairs if p.split("=", 1)[0] in OWN_KEYS]
    rest = [p for p in pairs if p.split("=", 1)[0] not in OWN_KEYS]
    opts = parse_args(RealOptions, own, allow_config_file=False)
    if not any(p.startswith("hw=") for p in rest) and local_profile() is not None:
        rest = [f"hw={LOCAL_PROFILE}", *rest]  # this machine's calibrated profile, when there is one
    if _replays_bundled_toy_as_default(rest):
        rest = [f"model={DEFAULT_MODEL}", *rest]  # run's mixtral-8x7b for it is 2-bit: not runnable here
    cfg = parse_run_config(rest)
    check_options(opts)
    tokens_given = any(p.split("=", 1)[0] == "tokens" for p in own)
    if cfg.workload.kind != "replay":  # a serving workload: its requests' lengths are the workload's
        if opts.live or (cfg.model and Path(cfg.model).is_dir()):
            raise UserError(f"workload.kind={cfg.workload.kind}: the live model runs the batch-1 replay of "
                            "held-out text; a serving workload runs on the synthetic model (no live=, no model=DIR)")
        if tokens_given:
            raise UserError(f"tokens= caps the replay's decode tokens; with workload.kind={cfg.workload.kind} "
                            "cap each request with workload.max_output=N (and workload.max_prompt=N)")
        from sim.serving.run import check_serving

        check_serving(cfg)
        return cfg, opts
    if opts.tokens and (tokens_given or not cfg.engine.max_tokens):
        cfg.engine.max_tokens = opts.tokens
    return cfg, opts


def check_options(opts: RealOptions) -> None:
    if opts.store not in STORES:
        raise UserError(f"store must be one of {', '.join(STORES)}, got {opts.store!r}")
    for name in ("layers", "tokens", "seqs", "seq_len"):
        if getattr(opts, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(opts, name)}")
    if opts.channels < 1:
        raise UserError(f"channels must be >= 1, got {opts.channels}")
    from sim.realrun.backend import Backend  # torch: only now

    Backend(opts.device, opts.threads)  # device=cuda without a GPU is refused here


def register_preset(preset: ModelPreset) -> str:
    """Make `preset` loadable by name in this process (a sliced or checkpoint-derived preset)."""
    have = PRESETS.get(preset.name)
    if have is not None and have != preset:
        raise UserError(f"model preset {preset.name!r} already exists with other sizes")
    PRESETS[preset.name] = preset
    return preset.name


def slice_layers(trace: Trace, preset: ModelPreset, n: int) -> tuple[Trace, ModelPreset]:
    """The first `n` MoE layers of a trace and the preset with `layers=n` (named `<preset>@L<n>`)."""
    L = trace.model.layers
    if n >= L:
        return trace, preset
    cut = lambda a: None if a is None else a[:, :n]  # noqa: E731
    model = dataclasses.replace(trace.model, layers=n, moe_layer_ids=tuple(trace.model.moe_layer_ids[:n]))
    sliced = dataclasses.replace(
        trace, model=model, experts=cut(trace.experts), weights=cut(trace.weights), logits=cut(trace.logits),
        pregate={d: a[:, :n] for d, a in trace.pregate.items()}, fisher=cut(trace.fisher),
        sensitivity=None if trace.sensitivity is None else trace.sensitivity[:n])
    return sliced, preset.with_overrides(name=f"{preset.name}@L{n}", layers=n)


def with_layers(cfg: RunConfig, trace: Trace, preset: ModelPreset, layers: int) -> tuple[RunConfig, Trace]:
    """cfg and trace restricted to `layers` MoE layers (0: unchanged)."""
    if not layers or layers >= trace.model.layers:
        return cfg, trace
    trace, sliced = slice_layers(trace, preset, layers)
    return dataclasses.replace(cfg, model=register_preset(sliced), quant=type(cfg.quant)()), trace


def preset_of(cfg: RunConfig, trace=None) -> ModelPreset:
    """The model realrun runs: `model=` with `model.*` and `quant.*` on top, or the trace's own."""
    from sim.machine.model_source import run_model
    from sim.runner import load_trace

    return run_model(cfg, trace if trace is not None else load_trace(cfg.trace))


def store_home() -> Path:
    """The default store folder: `realrun-store` in this user's cache folder (platformdirs:
    ~/.cache/moe-offload-sim/realrun-store on Linux), never inside the working folder."""
    import platformdirs

    return platformdirs.user_cache_path("moe-offload-sim") / "realrun-store"


def store_folder(store_dir: str, tag: str) -> Path:
    """Where the store `tag` lives: `<store_dir>/<tag>` (default store_dir: `store_home()`)."""
    return (Path(store_dir) if store_dir else store_home()) / tag


def model_info_for(preset: ModelPreset) -> ModelInfo:
    return ModelInfo(name=preset.name, layers=preset.layers, experts=preset.experts, top_k=preset.top_k,
                     hidden=preset.hidden, expert_width=preset.expert_width,
                     moe_layer_ids=tuple(range(preset.layers)))


def tier_for(hw, store: str):
    """The profile with its expert tier set to where the real run keeps experts (`store`), when the
    profile has that link; else unchanged (the profile then only feeds cost-aware policies)."""
    tier = "storage" if store == "disk" else "host"
    if hw.expert_tier == tier or f"{tier}_to_device" not in hw.links:
        return hw
    return dataclasses.replace(hw, expert_tier=tier)
