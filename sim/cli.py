"""`python -m sim COMMAND [key=value ...]`: the one command-line entry point.

Each command lives in its own module with a `main(argv: list[str]) -> int` function; this file
only dispatches, so that `python -m sim run` never imports torch or the tracer.
"""

from __future__ import annotations

import importlib
import os
import sys

from sim.errors import UserError, classify

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("sim.commands.run", "simulate one configuration; print a summary; write a results folder"),
    "list": ("sim.commands.list_cmd", "list policies (list policies: with their knobs), presets, hardware, models, traces"),
    "bench": ("sim.commands.bench", "measure the engine's simulated steps per second"),
    "paper": ("sim.commands.paper", "the AdapMoE paper's experiment: its parts one at a time, beside other policies"),
    "trace": ("sim.commands.trace", "run a live MoE checkpoint over a text and write a trace"),
    "import": ("sim.commands.import_cmd", "convert an external routing log (jsonl/csv/npz/vllm) to a trace"),
    "fisher-check": ("sim.commands.fisher_check", "validate Fisher sensitivities by really dropping experts"),
    "train-toy": ("sim.commands.train_toy", "train the bundled toy Mixtral-shaped MoE on CPU"),
    "split": ("sim.commands.split", "split a trace into a fit part and a test part (for learned policies)"),
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
    lines += ["", "python -m sim COMMAND --help: that command's keys (type, default, meaning) and outputs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error a user (or a failing machine) can cause ends here as one line.

    Exit status: 0 done; 2 a user error (`error: ...`, one line); 1 the machine failed (a full
    disk, an I/O error: one line saying so) or a sweep with failed points; 130 interrupted;
    141 stdout closed early (`python -m sim list | head`: quiet, as any Unix tool killed by SIGPIPE).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except Exception as err:
        known = classify(err)
        if known is None:
            raise  # a programming error: visible as one, with its traceback
        print(f"error: {_one_line(known)}", file=sys.stderr)
        return int(getattr(known, "exit_code", 2))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[command][0])
    if any(a in ("-h", "--help", "help") for a in rest):  # the docstring, then every key from the schema
        from sim.help import command_help

        print(command_help(command, module.__doc__ or COMMANDS[command][1]))
        sys.stdout.flush()
        return 0
    code = int(module.main(rest) or 0)
    sys.stdout.flush()  # a closed pipe shows here, inside the error handling, not at exit
    return code


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())  # a message is one line, whatever it quotes
    return text or type(err).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not complain about the pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured in tests)
        pass
