"""Where an input named on the command line lives: the path as given, or a bundled one by bare name.

    hw=jetson.yaml, hw=jetson      a bare name (no folder part): ./jetson.yaml if it exists, else
                                   the bundled hwprofiles/jetson.yaml
    hw=hwprofiles/jetson.yaml      the bundled folder spelled out: ./hwprofiles/... if it exists,
                                   else the bundled one, from any working folder
    hw=/some/dir/jetson.yaml       a path: that file, or an error naming it
    hw=conf/mine                   a path: conf/mine or conf/mine.yaml, or an error naming it

A path that does not exist is never swapped for a bundled file of the same name (issue 13: a typo
in a profile path silently ran the stock machine). The same rule serves traces (`traces/`).
"Bundled" is the checkout's folder or the copy an installed wheel ships (`sim/bundled.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sim import bundled as _bundled
from sim.errors import UserError, os_error


def is_bare_name(given: str) -> bool:
    """No folder part: `jetson.yaml`, `toy`; not `./jetson.yaml`, `x/jetson.yaml`, `/abs`."""
    return "/" not in given and given not in ("", ".", "..")


def _with_suffixes(p: Path, suffixes: Sequence[str]) -> list[Path]:
    if not suffixes or p.suffix in suffixes:
        return [p]
    return [p, *(p.with_name(p.name + s) for s in suffixes)]


def _exists(p: Path, want_dir: bool) -> bool:
    return p.is_dir() if want_dir else p.is_file()


def resolve_input(given: str, bundled: Path, *, what: str, suffixes: Sequence[str] = (), want_dir: bool = False,
                  available: Sequence[str] = (), example: str = "NAME") -> Path:
    """The file (or folder, `want_dir`) `given` names; see the module docstring. UserError if none."""
    kind = "folder" if want_dir else "file"
    p = Path(given)
    try:
        for c in _with_suffixes(p, suffixes):
            if _exists(c, want_dir):
                return c
        if p.exists():
            raise UserError(f"{what} {given} is a {'file' if want_dir else 'folder'}, not a {kind}")
        if is_bare_name(given):
            for c in _with_suffixes(bundled / given, suffixes):
                if _exists(c, want_dir):
                    return c
        elif (not p.is_absolute() and p.parts and p.parts[0] == bundled.name
              and bundled.parent == _bundled.root()):
            for c in _with_suffixes(bundled.parent / p, suffixes):
                if _exists(c, want_dir):
                    return c
    except OSError as err:  # a name too long, a loop of symbolic links
        raise os_error(err, given, f"reading {what}") from None
    listed = f"; available: {', '.join(available)}" if available else ""
    if is_bare_name(given):
        raise UserError(f"{what} {given!r} not found (neither a {kind} here nor in {bundled.name}/){listed}")
    raise UserError(f"{what} {kind} not found: {given} (only a bare name, such as {example}, is looked up "
                    f"in {bundled.name}/){listed}")
