"""`python -m sim COMMAND [key=value ...]`: the one command-line entry point.

Each command lives in its own module with a `main(argv: list[str]) -> int` function; this file
only dispatches, so that `python -m sim run` never imports torch or the tracer.
"""

from __future__ import annotations

import importlib
import inspect
import sys

from sim.errors import UserError

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("sim.commands.run", "simulate one configuration; print a summary; write a results folder"),
    "list": ("sim.commands.list_cmd", "list policies, hardware profiles, model presets and traces"),
    "bench": ("sim.commands.bench", "measure the engine's simulated steps per second"),
    "paper": ("sim.commands.paper", "the AdapMoE paper's experiment: its parts one at a time, beside other policies"),
    "trace": ("sim.commands.trace", "run a live MoE checkpoint over a text and write a trace"),
    "import": ("sim.commands.import_cmd", "convert an external routing log (jsonl/csv/npz) to a trace"),
    "fisher-check": ("sim.commands.fisher_check", "validate Fisher sensitivities by really dropping experts"),
    "train-toy": ("sim.commands.train_toy", "train the bundled toy Mixtral-shaped MoE on CPU"),
    "stats": ("sim.commands.stats", "routing statistics of a trace (entropy, reuse, pre-gating accuracy)"),
    "realrun": ("sim.commands.realrun", "replay a trace with real tensors and real copies (or a live checkpoint)"),
    "calibrate": ("sim.commands.calibrate", "measure this machine and write a hardware profile"),
    "confirm": ("sim.commands.confirm", "realrun beside run per policy arm: simulator error and ranking"),
    "sweep": ("sim.commands.sweep", "simulate a grid of configurations in parallel, resumably; table + report"),
    "report": ("sim.commands.report", "plotly HTML report of sweep and run folders (Pareto, speedup, timelines)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: python -m sim COMMAND [key=value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "python -m sim COMMAND --help: that command's keys, defaults and outputs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        if any(a in ("-h", "--help", "help") for a in rest):  # the command's own docstring: its keys and defaults
            print(inspect.cleandoc(module.__doc__ or COMMANDS[command][1]))
            return 0
        return int(module.main(rest) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
