"""User-facing errors, and the one mapping from what can go wrong to one line and an exit status.

`UserError` is the exception the CLI turns into a single line on stderr and exit status 2.
Raise it for anything the user can fix (a missing file, a bad value, a corrupt trace).
`MachineError` is the machine failing under a correct command (the disk is full, an I/O error):
one line saying so, exit status 1.

`classify(err)` is the mapping `sim.cli.main` applies to every command, so that an error a user
can cause never reaches the terminal as a traceback:

    OSError by errno    ENOSPC, EDQUOT, EFBIG, EIO, ENOMEM, ...    -> MachineError (exit 1)
                        ENOENT, EACCES, EPERM, EROFS, ENOTDIR,
                        EISDIR, ENAMETOOLONG, ELOOP, EEXIST, ...   -> UserError (exit 2)
    UnicodeDecodeError  a file that is not UTF-8 text               -> UserError
    OverflowError       a number too large for its type             -> UserError
    zipfile.BadZipFile  an archive that is not one                  -> UserError
    a Polars I/O error  "(os error N)" in its text                  -> by errno, as an OSError

Anything else is a programming error and propagates as an ordinary exception, visible as a bug.
Where the file or key is known, the code that reads it raises a `UserError` naming it; the
mapping here is the safety net and names the file when the exception carries one.
"""

from __future__ import annotations

import errno
import os
import re
import zipfile
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""

    exit_code = 2


class MachineError(Exception):
    """The machine failed under a correct command (disk full, I/O error): one line, exit status 1."""

    exit_code = 1


#: errnos that say the machine (not the command) failed: exit 1
MACHINE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "ENOMEM", "EMFILE", "ENFILE", "ENOBUFS")
    if hasattr(errno, name)
)
_POLARS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def errno_of(err: BaseException) -> int | None:
    """The errno of an OSError, or of a library error that reports one in its text (Polars)."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    m = _POLARS_OS_ERROR.search(str(err))
    return int(m.group(1)) if m else None


def os_error(err: BaseException, path: str | os.PathLike | None = None, doing: str = "") -> Exception:
    """One line for an OS-level failure `doing` something (`"writing"`) on `path` (or on the file the
    error names): a MachineError for a full disk or an I/O error, a UserError for the rest (a bad
    name, no permission, a read-only file system, ...)."""
    code = errno_of(err)
    reason = os.strerror(code) if code is not None else _first_line(err)
    name = path if path is not None else getattr(err, "filename", None)
    subject = " ".join(x for x in (doing or ("on" if name is not None else ""), "" if name is None else str(name))
                       if x)
    if code in MACHINE_ERRNOS:
        return MachineError(f"the machine failed{' ' + subject if subject else ''}: {reason} "
                            "(not a problem with the command: free space or fix the disk, and rerun)")
    if not doing:
        subject = "" if name is None else str(name)
    return UserError(f"{subject}: {reason}" if subject else reason)


def classify(err: BaseException) -> Exception | None:
    """The UserError / MachineError for an exception a user or the machine can cause; None for a bug."""
    if isinstance(err, (UserError, MachineError)):
        return err
    if isinstance(err, UnicodeDecodeError):
        return UserError(f"a file is not UTF-8 text ({err.reason} at byte {err.start})")
    if isinstance(err, OSError):
        return os_error(err)
    if isinstance(err, OverflowError):
        return UserError(f"a number is too large: {_first_line(err)}")
    if isinstance(err, zipfile.BadZipFile):
        return UserError(f"not a valid archive: {_first_line(err)}")
    if type(err).__module__.startswith("polars") and errno_of(err) is not None:
        return os_error(err)
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A user's text file as UTF-8; a missing, unreadable or undecodable file is a UserError naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise UserError(f"{what} {p} is a folder, not a file") from None
    except FileNotFoundError:
        raise UserError(f"{what} not found: {p}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {p} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise os_error(err, p, f"reading {what}") from None


def read_yaml_mapping(path: str | os.PathLike, what: str, holds: str) -> dict:
    """A user's YAML file that must hold a mapping (`holds` says of what, for the message); a
    missing or unreadable file, invalid YAML or another kind of document is a UserError naming it."""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of {holds}")
    return data
