"""Running the points of a sweep: in this process, on a local process pool, or on a Ray cluster.

Every executor runs `execute_point` on each (key, RunConfig) and hands each outcome to a
callback in the parent as soon as it arrives (in completion order); the parent writes it. A point
that raises is an outcome with an `error` string, never an exception of the sweep. Same config +
seed -> the same numbers in any executor (the simulator is deterministic; randomness only comes
from the config's seed).

- `local`, jobs = 1: one point after another in this process (no start-up cost; notebooks, tests).
- `local`, jobs > 1: `concurrent.futures.ProcessPoolExecutor` with `spawn` workers; each worker
  reads a trace once and keeps it (`sim.runner.load_trace` memoises). A worker that dies (killed,
  out of memory) breaks the pool: the points still pending are recorded as failed, to be rerun,
  and one line says which worker died and how. Workers die with their parent: on Linux the
  kernel kills them when it exits (`prctl(PR_SET_PDEATHSIG)`), and everywhere a watchdog thread
  in each worker ends it once its parent is gone (the parent pid changes), so a sweep whose
  parent is killed leaves no worker behind.
- `ray`: one Ray task per point. Without `ray.address` a local Ray instance with `jobs` CPUs is
  started (and stopped at the end); `ray.address=auto` or `HOST:PORT` joins an existing cluster;
  if Ray is already initialised in this process (a notebook, a test) that instance is used. The
  parent reads each trace and hardware profile once and ships them through Ray's object store, so
  the workers need the package installed but not the files.

Plug-ins (`plugins=`, `policies/registry.py`): each worker imports a point's plug-ins before
simulating it, with the parent's `sys.path` added to its own and plug-in files named by absolute
path, so a policy the parent can import runs on every executor. Entry-point plug-ins are found
by each worker's registries as in the parent.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.errors import UserError

Outcome = dict[str, Any]
OnResult = Callable[[str, Outcome], None]
RAY_EXTRA_HINT = "pip install -e .[cluster]  (or: pip install 'ray[default]')"


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    where = ""
    if not isinstance(err, UserError):
        frames = traceback.extract_tb(err.__traceback__)
        if frames:
            f = frames[-1]
            where = f" (at {Path(f.filename).name}:{f.lineno})"
    return f"{type(err).__name__}: {text}{where}"


def worker_config(cfg: Any) -> Any:
    """`cfg` as a worker gets it: its plug-in files as absolute paths (a worker may start elsewhere)."""
    spec = getattr(cfg, "plugins", "")
    if not spec:
        return cfg
    import dataclasses

    from policies.registry import is_plugin_file, split_plugins

    items = [str(Path(i).expanduser().resolve()) if is_plugin_file(i) else i for i in split_plugins(spec)]
    return dataclasses.replace(cfg, plugins=",".join(items))


def load_point_plugins(cfg: Any, sys_path: list[str] | None = None) -> None:
    """Import the point's plug-ins in this (worker) process, on the parent's import path."""
    spec = getattr(cfg, "plugins", "")
    if not spec:
        return
    for entry in sys_path or ():
        if entry not in sys.path:
            sys.path.append(entry)
    from policies.registry import load_plugins

    load_plugins(spec)


def execute_point(cfg: Any, trace: Any = None, hw: Any = None, sys_path: list[str] | None = None) -> Outcome:
    """Simulate one resolved RunConfig -> {summary, layers (column lists), error, wall_s}. Its
    plug-ins (`plugins=`) are imported first, with `sys_path` (the parent's) added to the path."""
    t0 = time.perf_counter()
    try:
        from sim.runner import simulate

        load_point_plugins(cfg, sys_path)

        res = simulate(cfg, trace=trace, hw=hw)  # with oracle/bound set, the bound keys too
        return {"summary": res.summary, "layers": res.layers.to_dict(as_series=False), "error": None,
                "wall_s": time.perf_counter() - t0}
    except Exception as err:  # a failing point is recorded, it does not stop the sweep
        return {"summary": None, "layers": None, "error": _error_text(err), "wall_s": time.perf_counter() - t0}


def failed(err: BaseException) -> Outcome:
    return {"summary": None, "layers": None, "error": _error_text(err), "wall_s": None}


# --------------------------------------------------------------------------------------- local


def run_serial(todo: list[tuple[str, Any]], on_result: OnResult) -> None:
    for key, cfg in todo:
        on_result(key, execute_point(cfg))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: this process ends when the sweep's parent process does (module docstring)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="sweep-parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_PERIOD_S)
    os._exit(1)  # orphaned: re-parented to init or a subreaper


def _worker_deaths(workers: dict[int, Any]) -> str:
    """`pid N killed by SIGKILL` for the pool's workers (`pid -> Process`) that died (best effort);
    the ones the pool itself then ends with SIGTERM are left out when another death explains it."""
    deaths, ended = [], []
    for pid, proc in workers.items():
        code = None
        for _ in range(50):  # the pool's own thread may be reaping it right now: its exit code comes soon
            try:
                proc.join(timeout=0.1)
            except (AssertionError, ValueError, OSError):  # pragma: no cover - not ours to join
                pass
            code = getattr(proc, "exitcode", None)
            if code is not None:
                break
        if code is not None and code != 0:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
                else f"exited with status {code}"
            (ended if code == -signal.SIGTERM else deaths).append(f"pid {pid} {how}")
    return ", ".join(deaths or ended) or "a worker process ended abruptly"


def run_local(todo: list[tuple[str, Any]], jobs: int, on_result: OnResult,
              log: Callable[[str], None] | None = None) -> None:
    """Points on `jobs` spawned worker processes (in this process when jobs == 1)."""
    if jobs <= 1 or len(todo) <= 1:
        run_serial(todo, on_result)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        path = list(sys.path)  # a plug-in importable here (PYTHONPATH, the working folder) is there too
        futures = {pool.submit(execute_point, worker_config(cfg), None, None, path): key for key, cfg in todo}
        workers = dict(getattr(pool, "_processes", None) or {})  # spawned by the submits (private state)
        broken: list[str] = []
        lost = 0
        try:
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except BrokenProcessPool:  # a worker died: this point and every pending one
                    if not broken:
                        broken.append(_worker_deaths(workers))
                    lost += 1
                    outcome = {"summary": None, "layers": None, "wall_s": None,
                               "error": f"WorkerDied: the sweep's worker process died ({broken[0]}); rerun to run it"}
                except Exception as err:
                    outcome = failed(err)
                on_result(futures[fut], outcome)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        if broken and log:
            log(f"error: a sweep worker died ({broken[0]}); {lost} unfinished point(s) are recorded as "
                "failed: rerun the same command to run them")


# ----------------------------------------------------------------------------------------- ray


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"executor=ray needs Ray, which is not installed: {RAY_EXTRA_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a `HOST:PORT` (or `ray://HOST:PORT`) address; None for "", `auto`, `local`.
    A malformed address is a UserError whether or not Ray is installed (checked before it is imported)."""
    if address in ("", "auto", "local"):
        return None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"ray.address={address!r}: expected auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    return host, int(port)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `HOST:PORT` (or `ray://HOST:PORT`) address must accept a TCP connection; `auto` is left to Ray."""
    parsed = parse_address(address)
    if parsed is None:
        return
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise UserError(f"ray.address={address}: cannot reach a Ray cluster there "
                        f"({err.strerror or err.__class__.__name__})") from None


def start_ray(ray: Any, jobs: int, address: str) -> bool:
    """Initialise Ray unless it already is; return whether this call started it (to shut it down)."""
    if ray.is_initialized():
        return False
    import logging

    check_reachable(address)
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, **kw)
    except ConnectionError as err:
        raise UserError(f"ray.address={address}: {str(err).splitlines()[0]}") from None
    return True


def run_ray(todo: list[tuple[str, Any]], jobs: int, address: str, on_result: OnResult) -> None:
    """One Ray task per point; traces and hardware profiles travel once through the object store."""
    parse_address(address)
    ray = import_ray()
    started = start_ray(ray, jobs, address)
    try:
        from sim.machine.hardware import load_profile
        from sim.runner import load_trace

        remote = ray.remote(num_cpus=1, max_retries=0)(execute_point)
        shared: dict[tuple[str, str], Any] = {}

        def ref(kind: str, name: str) -> Any:
            if (kind, name) not in shared:
                shared[(kind, name)] = ray.put(load_trace(name) if kind == "trace" else load_profile(name))
            return shared[(kind, name)]

        pending: dict[Any, str] = {}
        for key, cfg in todo:
            try:
                pending[remote.remote(worker_config(cfg), ref("trace", cfg.trace), ref("hw", cfg.hw),
                                      list(sys.path))] = key
            except Exception as err:  # an unreadable trace: this point fails, the others run
                on_result(key, failed(err))
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for r in done:
                try:
                    outcome = ray.get(r)
                except Exception as err:  # a worker crashed
                    outcome = failed(err)
                on_result(pending[r], outcome)
    finally:
        if started:
            ray.shutdown()
