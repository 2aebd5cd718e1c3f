"""Running the points of a sweep: in this process, on a local process pool, or on a Ray cluster.

Every executor runs `execute_point` on each (key, RunConfig) and hands each outcome to a
callback in the parent as soon as it arrives (in completion order); the parent writes it. A point
that raises is an outcome with an `error` string, never an exception of the sweep. Same config +
seed -> the same numbers in any executor (the simulator is deterministic; randomness only comes
from the config's seed).

- `local`, jobs = 1: one point after another in this process (no start-up cost; notebooks, tests).
- `local`, jobs > 1: `concurrent.futures.ProcessPoolExecutor` with `spawn` workers; each worker
  reads a trace once and keeps it (`sim.runner.load_trace` memoises). A worker that dies (killed,
  out of memory) breaks the pool: the points still pending are recorded as failed, to be rerun.
- `ray`: one Ray task per point. Without `ray.address` a local Ray instance with `jobs` CPUs is
  started (and stopped at the end); `ray.address=auto` or `HOST:PORT` joins an existing cluster;
  if Ray is already initialised in this process (a notebook, a test) that instance is used. The
  parent reads each trace and hardware profile once and ships them through Ray's object store, so
  the workers need the package installed but not the files.
"""

from __future__ import annotations

import socket
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


def execute_point(cfg: Any, trace: Any = None, hw: Any = None) -> Outcome:
    """Simulate one resolved RunConfig -> {summary, layers (column lists), error, wall_s}."""
    t0 = time.perf_counter()
    try:
        from sim.runner import simulate

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


def run_local(todo: list[tuple[str, Any]], jobs: int, on_result: OnResult) -> None:
    """Points on `jobs` spawned worker processes (in this process when jobs == 1)."""
    if jobs <= 1 or len(todo) <= 1:
        run_serial(todo, on_result)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(execute_point, cfg): key for key, cfg in todo}
        try:
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except Exception as err:  # BrokenProcessPool: a worker died
                    outcome = failed(err)
                on_result(futures[fut], outcome)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ----------------------------------------------------------------------------------------- ray


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"executor=ray needs Ray, which is not installed: {RAY_EXTRA_HINT}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `HOST:PORT` (or `ray://HOST:PORT`) address must accept a TCP connection; `auto` is left to Ray."""
    if address in ("", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"ray.address={address!r}: expected auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
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
    ray = import_ray()
    started = start_ray(ray, jobs, address)
    try:
        from sim.hardware import load_profile
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
                pending[remote.remote(cfg, ref("trace", cfg.trace), ref("hw", cfg.hw))] = key
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
