"""What every backend shares: the `Backend` protocol, `EvalSpec`, the data cache and `safe_evaluate`.

Every backend loads data through a `DataCache` (with an injectable loader, so tests can use
synthetic data) and turns an exception into a FAILED result with a reason, so one broken genome
never ends a search: `safe_evaluate` for one genome, and for a bucket (which trains several at
once) the same for each of its genomes. No jax import at module level: a worker process
must set its XLA flags before jax loads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
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


class BackendError(Exception):
    """A backend that cannot start: a missing optional dependency, a cluster out of reach or too small."""


class _Batches:
    """`evaluate` for a backend that has `submit` and `next_result`: submit every genome, then collect them."""

    def evaluate(self, genomes: Sequence[Genome], spec: EvalSpec, on_epoch: OnEpoch | None = None) -> Iterator[tuple[Genome, EvalResult]]:
        for g in genomes:
            self.submit(g, g, spec, None if on_epoch is None else (lambda epoch, row, g=g: on_epoch(g, epoch, row)))
        for _ in genomes:
            result = self.next_result()
            assert result is not None, "a submitted evaluation was lost"
            yield result


class _Finishing(_Batches):
    """`next_result` for a backend whose evaluations finish elsewhere (processes, threads) and put
    (tag, EvalResult) on `_done`; `submit` counts each in `_in_flight`."""

    def __init__(self) -> None:
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        if not self._in_flight:
            return None
        try:
            out = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        self._in_flight -= 1
        return out


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
    deadline: float | None = None,
) -> EvalResult:
    """train_and_evaluate on `device` (by `deadline`, if given); an exception becomes a FAILED result whose reason
    says where."""
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
            return train_and_evaluate(genome, dd, spec.trainer, spec.seed, on_epoch and reporting, spec.keep_variables, spec.test, fused,
                                      deadline)  # fmt: skip
    except _CallbackError as e:
        raise e.__cause__ from None
    except Exception as e:  # one broken genome must not end a search of many
        log.error("evaluation of %s raised%s:\n%s", genome, where, traceback.format_exc())
        return failed(genome, f"{type(e).__name__}{where}: {e}")


class _Stopped(Exception):
    """Raised at an epoch boundary inside an evaluation of a pool that is being closed."""


SINGLE_CORE_XLA = "--xla_cpu_multi_thread_eigen=false"


def single_threaded_xla(environ: Mapping[str, str]) -> dict[str, str]:
    """XLA_FLAGS for a process that trains on one CPU core (set before jax loads): `environ`'s own, with XLA's
    convolutions and matrix products on the calling thread added once (a process that has them passes them on
    unchanged, so it and its workers compile the same programs and share the compiled pieces)."""
    flags = environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": flags if SINGLE_CORE_XLA in flags.split() else f"{flags} {SINGLE_CORE_XLA}".strip()}


def cpu_workers() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
