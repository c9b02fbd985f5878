"""Evaluate several genomes at once on a multi-core CPU: one worker process per core, pinned.

Small CNNs do not keep two cores busy inside one XLA:CPU program, and vmapped convolutions ran
2.5-5x slower there (docs/benchmarks.md); separate single-threaded processes on separate cores
scale instead. Each worker loads the data once, keeps its compiled programs, and shares JAX's
persistent compilation cache with the others. Only plain values cross the process boundary.

No jax import at module level: a worker must set its XLA flags before jax loads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from fmnas_jax.data import DataConfig
from fmnas_jax.genome import Genome, count_params

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult, TrainConfig

_STATE: dict[str, Any] = {}


def cpu_workers() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(cores: Any, cache_dir: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    core = cores.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    # One thread per worker: the parallelism is across processes.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fmnas_jax.train import enable_compilation_cache

    if cache_dir:
        enable_compilation_cache(cache_dir)
    _STATE["core"] = core


def _device_data(data_cfg: DataConfig, seed: int, eval_batch: int) -> Any:
    from fmnas_jax import data as data_mod
    from fmnas_jax.train import to_device

    key = (data_cfg, seed, eval_batch)
    if _STATE.get("data_key") != key:
        _STATE["data"] = to_device(data_mod.load(data_cfg, seed), eval_batch)
        _STATE["data_key"] = key
    return _STATE["data"]


def _evaluate(genome: Genome, trainer: TrainConfig, data_cfg: DataConfig, seed: int, keep_variables: bool) -> EvalResult:
    from fmnas_jax.train import EvalResult, train_and_evaluate

    try:
        dd = _device_data(data_cfg, seed, trainer.eval_batch_size)
        return train_and_evaluate(genome, dd, trainer, seed, None, keep_variables)
    except Exception as e:  # reported to the parent as a failed evaluation
        return EvalResult(str(genome), "FAILED", count_params(genome), reason=f"{type(e).__name__} in worker {_STATE.get('core')}: {e}")


def _as_finished(futures: dict[Future, Genome]) -> Iterator[tuple[Genome, Any]]:
    """(genome, EvalResult) in the order the evaluations finish."""
    for fut in as_completed(futures):
        yield futures[fut], fut.result()


class WorkerPool:
    """`n` pinned single-threaded worker processes evaluating genomes."""

    def __init__(self, n: int, cache_dir: str | None) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked XLA threads
        cores = ctx.Queue()
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(n))
        for i in range(n):
            cores.put(allowed[i % len(allowed)])
        self.n = n
        self._pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(cores, cache_dir))

    def map_unordered(
        self, genomes: Sequence[Genome], trainer: TrainConfig, data_cfg: DataConfig, seed: int, keep_variables: bool = False
    ) -> Iterator[tuple[Genome, Any]]:
        """Yield (genome, EvalResult) as evaluations finish."""
        return _as_finished({self._pool.submit(_evaluate, g, trainer, data_cfg, seed, keep_variables): g for g in genomes})

    def close(self, now: bool = False) -> None:
        """Let running evaluations finish; with `now` (an interrupted search) stop the workers at once."""
        if not now:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        workers = list((getattr(self._pool, "_processes", None) or {}).values())  # CPython's executor keeps them there
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in workers:
            p.terminate()
        for p in workers:
            p.join(timeout=10)


class _Stopped(Exception):
    """Raised at an epoch boundary inside an evaluation of a pool that is being closed."""


class DevicePool:
    """One evaluation per accelerator at a time, several accelerators in one process.

    Genomes have different shapes, so the population is split across devices by placement (each
    evaluation runs whole on one device, its data placed there once) rather than by SPMD sharding of
    one program. JAX releases the GIL while a device computes, so one thread per device keeps them
    all busy. Results equal a single device's: the programs and inputs are the same.
    """

    def __init__(self, devices: Sequence[Any], per_device: int = 1) -> None:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self.devices = list(devices)
        self.n = len(self.devices) * per_device  # per_device > 1: several small programs in flight on one GPU
        self._free: queue.Queue = queue.Queue()
        for _ in range(per_device):
            for d in self.devices:
                self._free.put(d)
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="fmnas-device")
        self._data: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _run(self, genome: Genome, trainer: TrainConfig, data_cfg: DataConfig, seed: int, keep_variables: bool) -> EvalResult:
        import jax

        from fmnas_jax import data as data_mod
        from fmnas_jax.train import EvalResult, to_device, train_and_evaluate

        device = self._free.get()
        try:
            with jax.default_device(device):
                key = (device.id, data_cfg, seed, trainer.eval_batch_size)
                with self._lock:  # threads sharing a device share its copy of the data
                    if key not in self._data:
                        self._data[key] = to_device(data_mod.load(data_cfg, seed), trainer.eval_batch_size)
                return train_and_evaluate(genome, self._data[key], trainer, seed, self._check_stop, keep_variables)
        except Exception as e:  # one broken genome must not end the search
            return EvalResult(str(genome), "FAILED", count_params(genome), reason=f"{type(e).__name__} on {device}: {e}")
        finally:
            self._free.put(device)

    def map_unordered(
        self, genomes: Sequence[Genome], trainer: TrainConfig, data_cfg: DataConfig, seed: int, keep_variables: bool = False
    ) -> Iterator[tuple[Genome, Any]]:
        """Yield (genome, EvalResult) as evaluations finish."""
        return _as_finished({self._pool.submit(self._run, g, trainer, data_cfg, seed, keep_variables): g for g in genomes})

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


class BucketPool:
    """Masked buckets (fmnas_jax.batched) on one device: the genomes asked for together are grouped
    (`plan_buckets`: up to `max_models` per bucket, compute within `max_waste` x the genomes alone)
    and each bucket trains as one vmapped program. Opt-in (`batching=buckets`): meant for GPUs, where
    it is unmeasured so far; on XLA:CPU vmapped convolutions are slower than one model at a time."""

    def __init__(self, device: Any, max_models: int = 16, max_waste: float = 2.0) -> None:
        if max_models < 1 or max_waste < 1:
            raise ValueError(f"bucket_size {max_models} must be >= 1 and bucket_waste {max_waste} >= 1")
        self.device, self.n, self.max_waste = device, max_models, max_waste
        self._data: dict[tuple, Any] = {}

    def map_unordered(
        self, genomes: Sequence[Genome], trainer: TrainConfig, data_cfg: DataConfig, seed: int, keep_variables: bool = False
    ) -> Iterator[tuple[Genome, Any]]:
        """Yield (genome, EvalResult), bucket by bucket."""
        import jax

        from fmnas_jax import data as data_mod
        from fmnas_jax.batched import plan_buckets, train_batched
        from fmnas_jax.train import EvalResult, to_device

        with jax.default_device(self.device):
            key = (data_cfg, seed, trainer.eval_batch_size)
            if key not in self._data:
                self._data[key] = to_device(data_mod.load(data_cfg, seed), trainer.eval_batch_size)
            for group in plan_buckets(genomes, self.n, self.max_waste):
                try:
                    results = train_batched(group, self._data[key], trainer, seed, keep=keep_variables)
                except Exception as e:  # one broken bucket must not end the search
                    results = [EvalResult(str(g), "FAILED", count_params(g), reason=f"{type(e).__name__} in a bucket: {e}") for g in group]
                yield from zip(group, results, strict=True)

    def close(self, now: bool = False) -> None:
        """Buckets train in the caller's thread: an interrupt has already stopped them."""
        self._data.clear()
