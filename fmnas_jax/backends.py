"""Where genomes are trained: one `Backend` interface, four implementations, one data cache.

- `InProcess`: one at a time in this process (epochs stream to the caller).
- `Workers`: one pinned single-threaded process per CPU core. Small CNNs do not keep two cores
  busy inside one XLA:CPU program, and vmapped convolutions ran 2.5-5x slower there
  (docs/benchmarks.md); separate processes on separate cores scale instead.
- `Devices`: several evaluations in flight per accelerator, one thread each (JAX releases the
  GIL while a device computes).
- `Buckets`: the genomes asked for together train in masked buckets (fmnas_jax.batched), one
  vmapped program per bucket; opt-in, meant for GPUs.

Every backend loads data through a `DataCache` (with an injectable loader, so tests can use
synthetic data) and turns an exception into a FAILED result with a reason, so one broken genome
never ends a search: `safe_evaluate` for one genome, and for a bucket (which trains several at
once) the same for each of its genomes. No jax import at module level: a worker process
must set its XLA flags before jax loads.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fmnas_jax import data as data_mod
from fmnas_jax.data import DataConfig, Dataset
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import DeviceData, EvalResult, TrainConfig

log = logging.getLogger("fmnas_jax")
ACCELERATOR_SLOTS = 4  # evaluations in flight per GPU by default (unmeasured: see docs/benchmarks.md)
Loader = Callable[[DataConfig, int], Dataset]
OnEpoch = Callable[[Genome, int, dict[str, float]], None]
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class EvalSpec:
    """Everything besides the genome that an evaluation needs: trainer, data split, seed."""

    trainer: TrainConfig
    data: DataConfig
    seed: int
    keep_variables: bool = False
    test: bool = True  # measure test accuracy (the cheap rungs of a multi-fidelity search skip it: never reported)


class Backend(Protocol):
    """Trains genomes: `submit` one, `next_result` as each finishes (the scheduler's view), or `evaluate` a batch."""

    parallelism: int  # evaluations it runs at once (strategies may ask for this many together)
    description: str  # for the log
    streams_epochs: bool  # True: on_epoch is called as epochs end; False: results carry their whole history
    separate_processes: bool  # each slot is a process of its own (one in-process evaluation may use all their cores)

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        """Start (or queue) one evaluation; its result comes back from `next_result` with `tag`."""
        ...

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        """(tag, EvalResult) of the next evaluation to finish; None if none finished within `timeout` seconds
        (or nothing is submitted). Never raises for one genome's failure."""
        ...

    def evaluate(self, genomes: Sequence[Genome], spec: EvalSpec, on_epoch: OnEpoch | None = None) -> Iterator[tuple[Genome, EvalResult]]:
        """Yield (genome, EvalResult) in the order evaluations finish; never raises for one genome's failure."""
        ...

    def close(self, now: bool = False) -> None:
        """Release the backend; `now` (an interrupted search) stops evaluations in flight."""
        ...


class _Batches:
    """`evaluate` for a backend that has `submit` and `next_result`: submit every genome, then collect them."""

    def evaluate(self, genomes: Sequence[Genome], spec: EvalSpec, on_epoch: OnEpoch | None = None) -> Iterator[tuple[Genome, EvalResult]]:
        for g in genomes:
            self.submit(g, g, spec, None if on_epoch is None else (lambda epoch, row, g=g: on_epoch(g, epoch, row)))
        for _ in genomes:
            result = self.next_result()
            assert result is not None, "a submitted evaluation was lost"
            yield result


class DataCache:
    """Datasets placed on devices, each loaded once per (device, data settings, seed, eval batch); thread-safe."""

    def __init__(self, loader: Loader = data_mod.load) -> None:
        self.loader = loader
        self._placed: dict[tuple, DeviceData] = {}
        self._lock = threading.Lock()

    def get(self, spec: EvalSpec, device: Any = None) -> DeviceData:
        import jax

        from fmnas_jax.train import to_device

        device = device or jax.devices()[0]
        key = (device.id, device.platform, spec.data, spec.seed, spec.trainer.eval_batch_size)
        with self._lock:  # evaluations sharing a device share its copy of the data
            if key not in self._placed:
                if len(self._placed) >= 4:  # a few splits at most (rungs, the final budget), not one per budget forever
                    self._placed.clear()
                dataset = self.loader(spec.data, spec.seed)
                log.info("data: %s", dataset.summary())
                with jax.default_device(device):
                    self._placed[key] = to_device(dataset, spec.trainer.eval_batch_size)
            return self._placed[key]


class _CallbackError(Exception):
    """Carries an exception out of the on-epoch callback past safe_evaluate's net."""


def safe_evaluate(
    genome: Genome,
    spec: EvalSpec,
    cache: DataCache,
    where: str = "",
    on_epoch: Callable | None = None,
    device: Any = None,
    fused: bool = False,
) -> EvalResult:
    """train_and_evaluate on `device`; an exception becomes a FAILED result whose reason says where."""
    import jax

    from fmnas_jax.train import failed, train_and_evaluate

    def reporting(*args: Any) -> None:  # the caller's callback (the store): its errors are not the genome's
        try:
            on_epoch(*args)
        except _Stopped:
            raise  # a pool being closed: this evaluation ends FAILED, "interrupted"
        except Exception as e:
            raise _CallbackError from e

    try:
        dd = cache.get(spec, device)
        with jax.default_device(dd.device):
            return train_and_evaluate(genome, dd, spec.trainer, spec.seed, on_epoch and reporting, spec.keep_variables, spec.test, fused)
    except _CallbackError as e:
        raise e.__cause__ from None
    except Exception as e:  # one broken genome must not end a search of many
        log.error("evaluation of %s raised%s:\n%s", genome, where, traceback.format_exc())
        return failed(genome, f"{type(e).__name__}{where}: {e}")


class InProcess(_Batches):
    """One evaluation at a time, in this process: `next_result` trains the oldest submitted one.

    `fused` compiles each genome's whole step as one program: for a long training of one genome (the final
    retrain, +experiment=train) on several threads; a search's many genomes share compiled pieces instead."""

    parallelism, streams_epochs, separate_processes = 1, True, False

    def __init__(self, loader: Loader = data_mod.load, description: str = "in-process", fused: bool = False) -> None:
        self.cache, self.description, self.fused = DataCache(loader), description, fused
        self._queued: collections.deque = collections.deque()

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        self._queued.append((tag, genome, spec, on_epoch))

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        if not self._queued:
            return None
        tag, genome, spec, on_epoch = self._queued.popleft()
        return tag, safe_evaluate(genome, spec, self.cache, "", on_epoch, fused=self.fused)

    def close(self, now: bool = False) -> None:
        self._queued.clear()
        self.cache = DataCache(self.cache.loader)


# -- worker processes ---------------------------------------------------------------

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
    # One thread per worker: the parallelism is across processes.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fmnas_jax.runtime import enable_compilation_cache

    if cache_dir:
        enable_compilation_cache(cache_dir)
    _WORKER.update(core=core, cache=DataCache(loader))


def _worker_evaluate(genome: Genome, spec: EvalSpec) -> EvalResult:
    return safe_evaluate(genome, spec, _WORKER["cache"], f" in worker {_WORKER['core']}")


def cpu_workers() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Workers(_Batches):
    """`n` spawned single-threaded worker processes, each pinned to one core."""

    streams_epochs, separate_processes = False, True

    def __init__(self, n: int, cache_dir: str | None, loader: Loader = data_mod.load) -> None:
        from fmnas_jax.runtime import with_huge_pages

        if (env := with_huge_pages(os.environ)) is not None:  # the workers start with glibc's huge pages (fmnas_jax.runtime)
            os.environ["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked XLA threads
        cores = ctx.Queue()
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(n))
        for i in range(n):
            cores.put(allowed[i % len(allowed)])
        self.parallelism = n
        self.description = f"{n} worker processes, each pinned to one CPU core (backend=inprocess to train in this process)"
        self._pool = ctx.Pool(n, initializer=_init_worker, initargs=(cores, cache_dir, loader))
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        from fmnas_jax.train import failed

        self._in_flight += 1
        self._pool.apply_async(
            _worker_evaluate,
            (genome, spec),
            callback=lambda r: self._done.put((tag, r)),
            error_callback=lambda e: self._done.put((tag, failed(genome, f"{type(e).__name__} in a worker process: {e}"))),
        )

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        if not self._in_flight:
            return None
        try:
            out = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        self._in_flight -= 1
        return out

    def close(self, now: bool = False) -> None:
        """Let running evaluations finish; with `now` (an interrupted search) stop the workers at once."""
        if now:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()


# -- several evaluations in flight on each device -----------------------------------


class _Stopped(Exception):
    """Raised at an epoch boundary inside an evaluation of a pool that is being closed."""


class Devices(_Batches):
    """`per_device` evaluations in flight on each device, a thread each.

    Genomes have different shapes, so the population is split across devices by placement (each
    evaluation runs whole on one device, its data placed there once) rather than by SPMD sharding
    of one program. Results equal a single device's: the programs and inputs are the same.
    """

    streams_epochs, separate_processes = False, False

    def __init__(self, devices: Sequence[Any], per_device: int = 1, loader: Loader = data_mod.load, description: str = "") -> None:
        self.devices = list(devices)
        self.parallelism = len(self.devices) * per_device
        self.description = description or f"{per_device} evaluation(s) in flight on each of {len(self.devices)} device(s)"
        self._free: queue.Queue = queue.Queue()
        for _ in range(per_device):
            for d in self.devices:
                self._free.put(d)
        self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix="fmnas-device")
        self.cache = DataCache(loader)
        self._stop = threading.Event()
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0

    def _run(self, genome: Genome, spec: EvalSpec) -> EvalResult:
        device = self._free.get()
        try:
            return safe_evaluate(genome, spec, self.cache, f" on {device}", self._check_stop, device)
        finally:
            self._free.put(device)

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        self._in_flight += 1
        self._pool.submit(self._run, genome, spec).add_done_callback(lambda fut: self._done.put((tag, fut.result())))

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        if not self._in_flight:
            return None
        try:
            out = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        self._in_flight -= 1
        return out

    def _check_stop(self, epoch: int, row: dict[str, float]) -> None:
        if self._stop.is_set():
            raise _Stopped(f"stopped after epoch {epoch}: the search was interrupted")

    def stop(self) -> None:
        """Evaluations running or still to start end FAILED at their next epoch boundary."""
        self._stop.set()

    def close(self, now: bool = False) -> None:
        """Let running evaluations finish; with `now` they stop at their next epoch boundary
        (threads cannot be killed, and the interpreter waits for them before it exits)."""
        if now:
            self.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- masked buckets --------------------------------------------------------------------


class Buckets(_Batches):
    """Masked buckets on one device: the genomes asked for together are grouped (`plan_buckets`:
    up to `max_models` per bucket, compute within `max_waste` x the genomes alone) and each bucket
    trains as one vmapped program. On XLA:CPU vmapped convolutions are slower than one model at a time."""

    streams_epochs, separate_processes = False, False

    def __init__(self, device: Any, max_models: int = 16, max_waste: float = 2.0, loader: Loader = data_mod.load) -> None:
        from fmnas_jax.batched import check_bucket_limits

        check_bucket_limits(max_models, max_waste)
        self.device, self.parallelism, self.max_waste = device, max_models, max_waste
        self.description = f"masked buckets of up to {max_models} genomes (backend=buckets)"
        self.cache = DataCache(loader)
        self._queued: list[tuple[Any, Genome, EvalSpec]] = []
        self._ready: collections.deque = collections.deque()

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        self._queued.append((tag, genome, spec))

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        """Trains everything submitted so far (one spec at a time, in buckets) when no result is ready."""
        if not self._ready and self._queued:
            spec = self._queued[0][2]
            batch = [q for q in self._queued if q[2] == spec]
            self._queued = [q for q in self._queued if q[2] != spec]
            tags = {}
            for tag, g, _ in batch:
                tags.setdefault(g, []).append(tag)
            for g, result in self._train(list(tags), spec):
                self._ready.extend((tag, result) for tag in tags[g])
        return self._ready.popleft() if self._ready else None

    def _train(self, genomes: list[Genome], spec: EvalSpec) -> Iterator[tuple[Genome, EvalResult]]:
        import jax

        from fmnas_jax.batched import plan_buckets, train_batched
        from fmnas_jax.train import failed

        dd = self.cache.get(spec, self.device)
        for group in plan_buckets(genomes, self.parallelism, self.max_waste):
            try:
                with jax.default_device(self.device):
                    results = train_batched(group, dd, spec.trainer, spec.seed, keep=spec.keep_variables, test=spec.test)
            except Exception as e:  # one broken bucket must not end the search
                log.error("bucket of %d genomes raised:\n%s", len(group), traceback.format_exc())
                results = [failed(g, f"{type(e).__name__} in a bucket: {e}") for g in group]
            yield from zip(group, results, strict=True)

    def close(self, now: bool = False) -> None:
        """Buckets train in the caller's thread: an interrupt has already stopped them."""
        self._queued, self._ready = [], collections.deque()
        self.cache = DataCache(self.cache.loader)


def choose_backend(cfg: Any, cache_dir: str | None = None, loader: Loader = data_mod.load) -> Backend:
    """The backend `cfg` (a config.BackendConfig) names; for `auto`, the fastest path for this platform
    (its `description` says which, for the log).

    auto: accelerators get `per_device` evaluations in flight per device (a small CNN alone leaves a GPU idle
    between kernel launches, and compiles overlap too); several CPU devices (JAX_NUM_CPU_DEVICES) one
    evaluation per device; one multi-core CPU one single-threaded worker process per core (`workers`, 0 = all).
    """
    import jax

    from fmnas_jax.runtime import platform_summary

    devices, where, kind = jax.devices(), platform_summary(), cfg.kind
    if kind == "buckets":
        return Buckets(devices[0], cfg.bucket_size, cfg.bucket_waste, loader)
    if kind == "inprocess":
        return InProcess(loader, f"in-process on {where} (backend=inprocess)")
    if kind == "devices" or (kind == "auto" and jax.default_backend() != "cpu"):
        text = f"{cfg.per_device} evaluation(s) in flight on each of {len(devices)} device(s) ({where}; backend.per_device=N to change)"
        return Devices(devices, cfg.per_device, loader, text)
    if kind == "auto" and len(devices) > 1:
        chosen = devices[: cfg.workers or len(devices)]
        return Devices(chosen, 1, loader, f"{len(chosen)} devices, one evaluation on each at a time ({where})")
    n = cfg.workers or cpu_workers()
    if n > 1 or kind == "workers":
        return Workers(n, cache_dir, loader)
    return InProcess(loader, f"in-process on {where}")


@contextlib.contextmanager
def opened(backend: Backend) -> Iterator[Backend]:
    """Close the backend on the way out: gently after success, at once after Ctrl-C or an error."""
    try:
        yield backend
    except BaseException:
        backend.close(now=True)
        raise
    backend.close()
