"""`python -m sim COMMAND --help`: every key of a command, generated from its schema.

A command's keys are the fields of its options dataclass(es) (`RunConfig` with `EngineOptions`
and `QuantConfig` for `run`; each command's own dataclass in `sim/commands/*.py`), flattened to
dotted keys (`engine.prefill`). Each key is printed with its type, its default and one line of
meaning. The meaning is the field's trailing `# comment` in the dataclass source (read with
`inspect.getsource` and `tokenize`; a base class's fields keep their own comments), else a
`field(metadata={"help": ...})`, else the command's entry in `MEANINGS` below (for dataclasses
defined outside `sim/commands/`), else the meaning of a key every command uses the same way
(`COMMON`). `tests/test_help.py` checks that every key of every command has one.

    from sim.help import command_help, keys_table
    print(command_help("run"))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

#: meanings of keys that every command uses the same way (when the field has no comment)
COMMON = {
    "seed": "seeds every random choice (same arguments and seed: same numbers)",
    "overwrite": "replace an existing non-empty output folder (atomically: the old one stays until the new one is whole)",
    "progress": "show a progress bar on stderr",
    "threads": "compute threads (CPU); 1 leaves a core to the copy worker",
    "device": "cpu | cuda (| cuda:N)",
    "store_dir": "where store=disk keeps its expert stores (default: the user cache folder's realrun-store)",
}

#: meanings of fields of dataclasses outside `sim/commands/` that carry no comment, per command
MEANINGS: dict[str, dict[str, str]] = {
    "paper": {
        "trace": "trace folder, or a bundled name (toy)",
        "hw": "hardware profile: a YAML file, or a bundled name",
        "model": "model preset (python -m sim list)",
        "slots": "expert-cache slots of every arm",
        "T": "AdapMoE's gating threshold (the loss budget per dropped expert)",
        "out": "write the markdown table (and a .json beside it) here",
    },
    "calibrate": {
        "out": "the hardware profile to write",
        "name": "the profile's name",
        "repeats": "measurements per point (the median is kept)",
    },
    "confirm": {
        "calibrate": "calibrate now, even with profile= (`calibrate` alone means calibrate=true)",
        "arms": "policy presets to compare, plus `half` (half the slots) and `cpu_on_miss`",
        "model": "model preset of the arms' experts (python -m sim list)",
        "store": "disk (safetensors, page cache dropped) | host (host memory)",
        "out": "the confirm folder (default results/<time>-confirm)",
        "cal_repeats": "repeats per calibration point",
    },
    "trace": {
        "prompt_tokens": "tokens per prompt (prefilled)",
        "prompts": "prompts cut from the text",
    },
    "import": {
        "pos_field": "the log's field / column / array holding each token's position",
        "layer_field": "... holding the MoE layer",
        "experts_field": "... holding the routed expert ids",
        "weights_field": "... holding the routing weights",
        "phase_field": "... holding prefill | decode",
    },
    "train-toy": {
        "steps": "optimiser steps",
        "lr": "peak learning rate (AdamW, cosine schedule)",
        "weight_decay": "AdamW weight decay",
        "grad_clip": "clip the gradient norm to this",
        "log_every": "steps between log lines (train_log.csv)",
        "eval_every": "steps between held-out evaluations",
        "model.hidden": "width of the residual stream",
        "model.heads": "attention heads",
        "model.kv_heads": "key/value heads (grouped-query attention)",
        "model.experts": "experts per MoE layer",
        "model.top_k": "experts routed per token",
        "model.rope_theta": "RoPE base frequency",
    },
}


@dataclass
class Section:
    """A group of keys of one command: the fields of `schema`, each key prefixed by `prefix`."""

    title: str
    schema: type
    prefix: str = ""
    exclude: tuple[str, ...] = ()


@dataclass
class Key:
    key: str
    type: str
    default: str
    meaning: str


# ------------------------------------------------------------------------- reading the schema


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the trailing `# comment` of its line(s) in the source of `cls` and of its
    dataclass bases (a subclass's own comment wins). Empty where the source cannot be read."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        out.update(_own_comments(klass))
    return out


def _own_comments(klass: type) -> dict[str, str]:
    import ast

    try:
        source = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            end = getattr(stmt, "end_lineno", stmt.lineno) or stmt.lineno
            lines = [comments[n] for n in range(stmt.lineno, end + 1) if n in comments]
            text = " ".join(lines).strip()
            text = text.split("noqa")[0].split("type: ignore")[0].strip().rstrip("-").strip()
            if text:
                out[stmt.target.id] = text
    return out


def type_name(hint: Any) -> str:
    """A field's type as a user types its value: `int`, `float|null`, `list[float]`, `section`."""
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(hint))
    if origin is dict:
        return "section"
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"list[{type_name(args[0])}]" if args else "list"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, dict):
        return "-" if not value else ",".join(f"{k}={default_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(default_text(v) for v in value) if value else "[]"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def schema_keys(schema: type, prefix: str = "", meanings: dict[str, str] | None = None,
                exclude: tuple[str, ...] = ()) -> list[Key]:
    """Every dotted key of a dataclass schema, with its type, default and meaning ("" if none)."""
    meanings = meanings or {}
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: shown as written
        hints = {}
    comments = field_comments(schema)
    keys: list[Key] = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if key in exclude or f.name.startswith("_"):
            continue
        hint = hints.get(f.name, f.type)
        value = _default(f)
        sub = hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else (
            type(value) if dataclasses.is_dataclass(value) else None)
        if sub is not None:
            keys += schema_keys(sub, key + ".", meanings, exclude)
            continue
        meaning = (comments.get(f.name) or str(f.metadata.get("help", "")) or meanings.get(key)
                   or COMMON.get(f.name, ""))
        keys.append(Key(key, type_name(hint), default_text(value), meaning))
    return keys


def keys_table(keys: list[Key], indent: str = "  ") -> str:
    """One line per key: key, type, default, meaning (columns aligned)."""
    if not keys:
        return f"{indent}(none)"
    wk = max(len(k.key) for k in keys)
    wt = max(len(k.type) for k in keys)
    wd = min(24, max(len(k.default) for k in keys))
    lines = []
    for k in keys:
        default = k.default if len(k.default) <= wd else k.default[: wd - 3] + "..."
        lines.append(f"{indent}{k.key.ljust(wk)}  {k.type.ljust(wt)}  {default.ljust(wd)}  {k.meaning}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------- per command


@dataclass
class CommandSpec:
    sections: list[Section]
    config_file: bool = False  # takes config=FILE.yaml
    positional: str = ""  # a line about positional arguments
    notes: tuple[str, ...] = ()


def _run_sections(title: str = "keys") -> list[Section]:
    from sim.config import RunConfig

    return [Section(title, RunConfig)]


def command_spec(command: str) -> CommandSpec | None:
    """The schema(s) of `command` (None: the command takes no keys)."""
    if command == "run":
        return CommandSpec(_run_sections(), config_file=True, notes=(_policy_note(),))
    if command == "sweep":
        from sim.commands.sweep import SweepOptions

        grid = _run_sections("grid keys: every run key but the run's output ones, each with a comma list V1,V2 "
                             "or a range a:b:step (one value: the same at every point)")
        grid[0].exclude = ("out", "name", "report", "overwrite")
        return CommandSpec([Section("the sweep's own keys", SweepOptions), *grid], notes=(_policy_note(),))
    if command == "realrun":
        from sim.realrun.build import RealOptions

        return CommandSpec([Section("the real run's own keys", RealOptions),
                            *_run_sections("run keys (the simulated configuration it executes)")],
                           notes=(_policy_note(),))
    if command == "report":
        from sim.commands.report import ReportOptions

        return CommandSpec([Section("keys", ReportOptions)], positional="DIR...: sweep folders and run folders")
    if command == "import":
        from sim.commands.import_cmd import ImportArgs

        return CommandSpec([Section("keys", ImportArgs)], config_file=True,
                           positional="FILE: the routing log (the same as file=FILE)")
    if command == "list":
        from sim.commands.list_cmd import ListOptions

        return CommandSpec([Section("keys", ListOptions)],
                           positional="[policies|presets|hardware|models|traces]: only that part")
    simple = {  # command -> (module, dataclass, takes config=)
        "bench": ("sim.commands.bench", "BenchArgs", True),
        "paper": ("sim.paper", "PaperArgs", True),
        "trace": ("sim.commands.trace", "TraceArgs", True),
        "fisher-check": ("sim.commands.fisher_check", "FisherCheckArgs", True),
        "train-toy": ("sim.commands.train_toy", "TrainToyArgs", False),
        "stats": ("sim.commands.stats", "StatsArgs", True),
        "split": ("sim.commands.split", "SplitArgs", False),
        "calibrate": ("sim.realrun.calibrate", "CalibrateOptions", False),
        "confirm": ("sim.commands.confirm", "ConfirmCommandOptions", False),
    }
    if command in simple:
        import importlib

        module, name, config_file = simple[command]
        return CommandSpec([Section("keys", getattr(importlib.import_module(module), name))], config_file=config_file)
    return None


def _policy_note() -> str:
    from policies.presets import PRESETS
    from sim.config import RunConfig

    preset = PRESETS.get(RunConfig.policy, {})
    parts = []
    for sec in ("gating", "prefetch", "cache", "placement"):
        parts += [f"{sec}.{k}={default_text(v)}" for k, v in preset.get(sec, {}).items()]
    return ("gating.*, prefetch.*, cache.*, placement.*: the policy's name and knobs; every policy's knobs: "
            f"python -m sim list policies. The default preset ({RunConfig.policy}) sets: {' '.join(parts)}")


def command_keys(command: str) -> list[tuple[Section, list[Key]]]:
    spec = command_spec(command)
    if spec is None:
        return []
    meanings = MEANINGS.get(command, {})
    return [(s, schema_keys(s.schema, s.prefix, meanings, s.exclude)) for s in spec.sections]


def command_help(command: str, doc: str = "") -> str:
    """The whole `--help` text: the command's docstring, then its keys."""
    parts = [inspect.cleandoc(doc)] if doc else []
    try:
        spec = command_spec(command)
        sections = command_keys(command)
    except ImportError as err:  # the command's schema lives beside code that needs an optional package
        return "\n\n".join([*parts, f"(its keys are listed once {err.name or 'its dependencies'} is installed: "
                                    f"pip install -e .[trace])"])
    if spec is None:
        return "\n".join(parts)
    if spec.positional:
        parts.append(f"positional: {spec.positional}")
    for section, keys in sections:
        parts.append(f"{section.title} (key=value; type, default, meaning):\n{keys_table(keys)}")
    if spec.config_file:
        parts.append("config=FILE.yaml loads a whole config (a run's own config.yaml reruns it); key=value pairs "
                     "apply on top.")
    parts += list(spec.notes)
    return "\n\n".join(parts)
