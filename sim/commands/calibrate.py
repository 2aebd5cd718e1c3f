"""`python -m sim calibrate device=cpu|cuda store=disk|host out=hwprofiles/local.yaml [model=PRESET]
[sizes=B,B,...] [repeats=N]`: measure this machine with the real-run code and write a profile.

Every number in the written profile carries `measured: python -m sim calibrate ..., <date>` as
its source; the file is checked with `sim.machine.hardware.load_profile` before it replaces `out`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import yaml


def command_line(argv: list[str]) -> str:
    return " ".join(["python -m sim calibrate", *argv])


def write_profile(prof: dict, out: Path, header: str) -> None:
    """Write atomically, after checking that the profile loads."""
    from sim.errors import UserError
    from sim.machine.hardware import load_profile

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(header + yaml.safe_dump(prof, sort_keys=False, width=200))
            fh.flush()
            os.fsync(fh.fileno())
        load_profile(tmp)  # a profile that does not load is a bug here, never a file left behind
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str]) -> int:
    from sim import atomic
    from sim.args import parse_args
    from sim.realrun.calibrate import CalibrateOptions
    from sim.realrun.profile import calibrate

    opts = parse_args(CalibrateOptions, argv, allow_config_file=False)
    cmd = command_line(argv)
    with atomic.claim_file(Path(opts.out), what="profile"):  # checked and claimed before measuring
        prof, rows = calibrate(opts, cmd)
        header = (f"# Measured on this machine by `{cmd}`.\n"
                  "# Every number's source says how; schema and conventions in hwprofiles/README.md.\n")
        write_profile(prof, Path(opts.out), header)
    width = max(len(r[0]) for r in rows)
    print(f"{'measured'.ljust(width)}  {'value'.ljust(28)}  spread (p10-p90 / median)")
    for what, value, spread in rows:
        print(f"{what.ljust(width)}  {value.ljust(28)}  {spread}")
    print(f"profile: {opts.out}", file=sys.stderr)
    return 0
