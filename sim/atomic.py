"""Atomic outputs: claimed before the work, written whole or not at all, never two writers at once.

Files are written to a temporary sibling and renamed into place (`os.replace` is atomic on one
file system). A command's output folder or file is *claimed* before its work starts:

    with atomic.new_dir(out) as tmp:      # claims `out`: checks, lock, stale temps removed
        ... the work, writing into tmp ... # (the simulation, the import, the tracing)
    # here `out` is complete; on any error tmp is removed and nothing is left behind

    with atomic.claim_file(path):          # the same for one file (stats json=, paper out=, ...)
        ... the work ...
        atomic.write_text(path, text)

A claim is an exclusive `flock` on `.NAME.lock` beside the output, taken without waiting: a second
command writing the same output fails at once (`UserError`, exit 2) instead of replacing the
first one's result after its whole run. The kernel drops the lock when its process dies, so a
claim whose lock can be taken has no live owner, and its leftovers (`.NAME.tmp-<pid>-*` folders,
`.NAME.*.tmp` files, of a process killed mid-write) are removed by the next claim of that output,
as are those of any dead process beside it. The lock file itself is removed on release.

Before the lock, the path is checked (`check_output_path`): each name within the file system's
limit, no file where a folder must be, the nearest existing folder writable, enough free space for
what the caller expects to write. An OS error while writing the output becomes one line: a
`MachineError` (exit 1) for a full disk or an I/O error, a `UserError` (exit 2) otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sim.errors import MACHINE_ERRNOS, UserError, errno_of, os_error

NAME_MAX = 255  # bytes per path component (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # so that the one line names the file
            err.filename = str(path)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


# ------------------------------------------------------------------------- checking a path


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_path(out: Path, *, folder: bool, overwrite: bool = False, need_bytes: float = 0,
                      what: str = "output", replaces: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written (UserError), including one
    on a disk with less than `need_bytes` free. See the module docstring. `replaces`: with
    `overwrite`, a non-empty folder is replaced only if it holds one of these files (it is an
    earlier output of the same kind, not a folder that happens to be named)."""
    out = Path(out)
    shown = f"{what} {out}"
    if out.name in ("", ".", ".."):
        raise UserError(f"{shown}: not a {'folder' if folder else 'file'} name")
    for part in out.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{shown}: a name in it is {len(os.fsencode(part))} bytes long (at most {NAME_MAX})")
    if len(os.fsencode(os.path.abspath(out))) >= PATH_MAX:
        raise UserError(f"{shown}: the path is longer than {PATH_MAX} bytes")
    try:
        base = _nearest_existing(out)
        if base == out:
            if folder and not out.is_dir():
                raise UserError(f"{shown} exists and is not a folder")
            if not folder and out.is_dir():
                raise UserError(f"{shown} is a folder; give a file name")
            if folder and any(out.iterdir()) and not overwrite:
                raise UserError(f"output folder {out} already exists and is not empty (pass overwrite=true)")
            missing = [name for name in replaces if not (out / name).exists()] if folder and overwrite else []
            if missing and any(out.iterdir()):  # an earlier output of this command holds all of them
                raise UserError(f"{shown} holds no {missing[0]}: it is not an earlier output of this command, "
                                f"and overwrite=true replaces only those; choose another folder")
            base = out.parent
        else:
            os.stat(base)  # a loop of symbolic links shows here
            if not base.is_dir():
                raise UserError(f"{shown}: {base} is a file, not a folder")
    except OSError as err:
        raise os_error(err, out, f"writing {what}") from None
    if not os.access(base, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(base) else "permission denied"
        raise UserError(f"{shown}: cannot write in {base} ({reason})")
    usage = shutil.disk_usage(base)
    if getattr(usage, "total", None) == 0:  # /proc, /sys: not a file system that stores files
        raise UserError(f"{shown}: {base} is not on a file system that can hold files")
    if need_bytes and usage.free < need_bytes:  # known before the work: the user picks another place
        raise UserError(f"not enough free space for {shown}: {usage.free / 1e6:.1f} MB free on {base}, about "
                        f"{need_bytes / 1e6:.0f} MB needed (free space or choose another place)")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_new_dir(out: Path, *, overwrite: bool = False) -> None:
    """Refuse an output folder that exists and is not empty (unless `overwrite`), or cannot be written."""
    check_output_path(Path(out), folder=True, overwrite=overwrite)


# ------------------------------------------------------------------------------------ locks


def lock_path(out: Path) -> Path:
    return Path(out).with_name(f".{Path(out).name}.lock")


class _Lock:
    """An exclusive, non-blocking flock on a lock file that is removed on release.

    After taking the lock the file must still be the one at the path (another owner may have
    removed it on release between our open and our flock); if not, try again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return True
            os.close(fd)
        return False

    def owner(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (process {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_stale(folder: Path, name: str | None = None) -> None:
    """Remove the leftovers of dead writers in `folder`: for output `name` (whose lock the caller
    holds) all of them; for other outputs those whose lock is free and whose pid is not alive."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        n = p.name
        if not n.startswith("."):
            continue
        if name is not None and (n.startswith(f".{name}.tmp-") or (n.startswith(f".{name}.") and n.endswith(".tmp"))):
            _remove(p)
            continue
        if ".tmp-" not in n or n.endswith(".lock"):
            continue
        other, _, tail = n[1:].rpartition(".tmp-")
        pid = tail.split("-", 1)[0]
        if not other or not pid.isdigit() or _pid_alive(int(pid)):
            continue  # another live writer's, or not ours to judge
        lock = _Lock(Path(folder) / f".{other}.lock")
        if lock.acquire():  # nobody holds it: the writer is gone
            try:
                _remove(p)
            finally:
                lock.release()


# ------------------------------------------------------------------------------------ claims


class Claim:
    """An output this process is writing (see the module docstring): `acquire`, then `release`."""

    def __init__(self, out: Path, *, folder: bool, overwrite: bool = False, need_bytes: float = 0,
                 what: str = "output", replaces: tuple[str, ...] = ()):
        self.out, self.folder, self.overwrite, self.what = Path(out), folder, overwrite, what
        self.need_bytes, self.replaces = need_bytes, tuple(replaces)
        self.tmp: Path | None = None
        self._lock: _Lock | None = None
        self._made: list[Path] = []  # parent folders this claim created (removed again on failure)

    def acquire(self) -> Claim:
        out = self.out
        check_output_path(out, folder=self.folder, overwrite=self.overwrite, need_bytes=self.need_bytes,
                          what=self.what, replaces=self.replaces)
        try:
            self._make_parents()
            lock = _Lock(lock_path(out))
            if not lock.acquire():
                raise UserError(f"{self.what} {out} is being written by another command{lock.owner()}; "
                                f"wait for it or choose another path")
            self._lock = lock
        except OSError as err:
            self._undo_parents()
            raise os_error(err, out, f"writing {self.what}") from None
        except BaseException:
            self._undo_parents()
            raise
        try:
            self._restore_interrupted_overwrite()
            remove_stale(out.parent, out.name)
            check_output_path(out, folder=self.folder, overwrite=self.overwrite, what=self.what,
                              replaces=self.replaces)  # under the lock
            if self.folder:
                self.tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
                os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
        except BaseException as err:
            self.release(ok=False)
            if isinstance(err, OSError):
                raise os_error(err, out, f"writing {self.what}") from None
            raise
        return self

    def _make_parents(self) -> None:
        missing = []
        p = self.out.parent
        while not os.path.lexists(p) and p.parent != p:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made.append(d)

    def _undo_parents(self) -> None:
        for d in reversed(self._made):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._made = []

    def _restore_interrupted_overwrite(self) -> None:
        """A writer killed between moving the old `out` aside and renaming the new one in: put it back."""
        if not self.folder:
            return
        for old in sorted(self.out.parent.glob(f".{self.out.name}.old-*")):
            if os.path.lexists(self.out):
                _remove(old)  # killed after the new folder was in place: the old one is litter
            else:
                os.replace(old, self.out)

    def commit(self) -> None:
        """Make the claimed folder's content the output (replacing an old one when `overwrite`)."""
        if not self.folder or self.tmp is None:
            return
        out = self.out
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(self.tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, out)
        self.tmp = None

    def release(self, *, ok: bool) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not ok:
            self._undo_parents()
        self._made = []

    def translate(self, err: BaseException) -> BaseException:
        """An OS error while the claim is held, as one line naming the output (see `sim.errors`)."""
        code = errno_of(err)
        if code is None or not isinstance(err, Exception):
            return err
        name = getattr(err, "filename", None)
        mine = _within(name, self.out, self.tmp)
        if (code in MACHINE_ERRNOS and (mine or name is None)) or (
                mine and code in (errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.ELOOP)):
            return os_error(err, self.out, f"writing {self.what}")
        return err


def _within(name: object, *roots: Path | None) -> bool:
    if name is None:
        return False
    p = os.path.abspath(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else ""
    return any(r is not None and (p == os.path.abspath(r) or p.startswith(os.path.abspath(r) + os.sep))
               for r in roots)


@contextlib.contextmanager
def _held(claim: Claim) -> Iterator[Claim]:
    claim.acquire()
    try:
        yield claim
        claim.commit()
    except BaseException as err:
        mapped = claim.translate(err)
        claim.release(ok=False)
        if mapped is not err:
            raise mapped from None
        raise
    claim.release(ok=True)


@contextlib.contextmanager
def new_dir(out: Path, *, overwrite: bool = False, need_bytes: float = 0, what: str = "output folder",
            replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """Claim the folder `out` and yield a temporary folder beside it; on success it becomes `out`,
    on any error it is removed. Parent folders are created as needed (and removed on failure). An
    existing non-empty `out` is an error unless `overwrite`, in which case it is replaced only once
    the new folder is complete (and, with `replaces`, only if it holds one of those files)."""
    with _held(Claim(out, folder=True, overwrite=overwrite, need_bytes=need_bytes, what=what,
                     replaces=replaces)) as claim:
        assert claim.tmp is not None
        yield claim.tmp


@contextlib.contextmanager
def claim_file(path: Path, *, need_bytes: float = 0, what: str = "output file") -> Iterator[Path]:
    """Claim the file `path` (checks, lock, stale temps removed) for the duration of the block; the
    block writes it with `write_bytes`/`write_text`. An existing file is replaced."""
    with _held(Claim(path, folder=False, need_bytes=need_bytes, what=what)) as claim:
        yield claim.out
