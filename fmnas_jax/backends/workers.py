"""`Workers`: one pinned single-threaded process per CPU core.

Small CNNs do not keep two cores busy inside one XLA:CPU program, and vmapped convolutions ran 2.5-5x
slower there (docs/benchmarks.md); separate processes on separate cores scale instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
from typing import TYPE_CHECKING, Any

from fmnas_jax import data as data_mod
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult

from fmnas_jax.backends.base import DataCache, EpochCallback, EvalSpec, Loader, _Finishing, safe_evaluate, single_threaded_xla

log = logging.getLogger("fmnas_jax")


_WORKER: dict[str, Any] = {}


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, so a killed search leaves no evaluation training on."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the worker ends when it next reads its closed task queue
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_worker(cores: Any, cache_dir: str | None, loader: Loader) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    _die_with_parent()
    core = cores.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    os.environ.update(single_threaded_xla(os.environ))  # one thread per worker: the parallelism is across processes
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fmnas_jax.runtime import enable_compilation_cache

    if cache_dir:
        enable_compilation_cache(cache_dir)
    _WORKER.update(core=core, cache=DataCache(loader))


def _worker_evaluate(genome: Genome, spec: EvalSpec) -> EvalResult:
    return safe_evaluate(genome, spec, _WORKER["cache"], f" in worker {_WORKER['core']}")


class Workers(_Finishing):
    """`n` spawned single-threaded worker processes, each pinned to one core, started at the first evaluation: a
    search that finds everything stored (a rerun, a finished search resumed) starts none."""

    streams_epochs, separate_processes = False, True

    def __init__(self, n: int, cache_dir: str | None, loader: Loader = data_mod.load) -> None:
        from fmnas_jax.runtime import with_huge_pages

        super().__init__()
        if (env := with_huge_pages(os.environ)) is not None:  # the workers start with glibc's huge pages (fmnas_jax.runtime)
            os.environ["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked XLA threads
        cores = ctx.Queue()
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(n))
        for i in range(n):
            cores.put(allowed[i % len(allowed)])
        self.parallelism = n
        self.description = f"{n} worker processes, each pinned to one CPU core (backend=inprocess to train in this process)"
        self._start = lambda: ctx.Pool(n, initializer=_init_worker, initargs=(cores, cache_dir, loader))
        self._pool: Any = None

    def _started(self) -> Any:
        """The pool, started now if it has not been."""
        if self._pool is None:
            self._pool = self._start()
        return self._pool

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        from fmnas_jax.train import failed

        self._in_flight += 1
        self._started().apply_async(
            _worker_evaluate,
            (genome, spec),
            callback=lambda r: self._done.put((tag, r)),
            error_callback=lambda e: self._done.put((tag, failed(genome, f"{type(e).__name__} in a worker process: {e}"))),
        )

    def close(self, now: bool = False) -> None:
        """Let running evaluations finish; with `now` (an interrupted search) stop the workers at once."""
        if self._pool is None:
            return
        if now:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()
