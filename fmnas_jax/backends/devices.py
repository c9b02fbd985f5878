"""`Devices`: several evaluations in flight per accelerator, one thread each (JAX releases the GIL
while a device computes).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fmnas_jax import data as data_mod
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult

from fmnas_jax.backends.base import DataCache, EpochCallback, EvalSpec, Loader, _Finishing, _Stopped, safe_evaluate

log = logging.getLogger("fmnas_jax")


class Devices(_Finishing):
    """`per_device` evaluations in flight on each device, a thread each.

    Genomes have different shapes, so the population is split across devices by placement (each
    evaluation runs whole on one device, its data placed there once) rather than by SPMD sharding
    of one program. Results equal a single device's: the programs and inputs are the same.
    """

    streams_epochs, separate_processes = False, False

    def __init__(self, devices: Sequence[Any], per_device: int = 1, loader: Loader = data_mod.load, description: str = "") -> None:
        self.devices = list(devices)
        super().__init__()
        self.parallelism = len(self.devices) * per_device
        self.description = description or f"{per_device} evaluation(s) in flight on each of {len(self.devices)} device(s)"
        self._free: queue.Queue = queue.Queue()
        for _ in range(per_device):
            for d in self.devices:
                self._free.put(d)
        self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix="fmnas-device")
        self.cache = DataCache(loader)
        self._stop = threading.Event()

    def _run(self, genome: Genome, spec: EvalSpec) -> EvalResult:
        device = self._free.get()
        try:
            return safe_evaluate(genome, spec, self.cache, f" on {device}", self._check_stop, device)
        finally:
            self._free.put(device)

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        self._in_flight += 1
        self._pool.submit(self._run, genome, spec).add_done_callback(lambda fut: self._done.put((tag, fut.result())))

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
