"""`InProcess`: one evaluation at a time in this process (epochs stream to the caller)."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from fmnas_jax import data as data_mod
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult

from fmnas_jax.backends.base import DataCache, EpochCallback, EvalSpec, Loader, _Batches, safe_evaluate

log = logging.getLogger("fmnas_jax")


class InProcess(_Batches):
    """One evaluation at a time, in this process: `next_result` trains the oldest submitted one.

    `fused` compiles each genome's whole step as one program: for a long training of one genome (the final
    retrain, +experiment=train) on several threads; a search's many genomes share compiled pieces instead.
    `deadline` (a time.monotonic() value, or None): each evaluation trains the epochs that end by then (at least
    one; the learning-rate schedule re-planned to them): a time-budgeted search's final retrain."""

    parallelism, streams_epochs, separate_processes = 1, True, False

    def __init__(
        self, loader: Loader = data_mod.load, description: str = "in-process", fused: bool = False, deadline: float | None = None
    ) -> None:
        self.cache, self.description, self.fused, self.deadline = DataCache(loader), description, fused, deadline
        self._queued: collections.deque = collections.deque()

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        self._queued.append((tag, genome, spec, on_epoch))

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        if not self._queued:
            return None
        tag, genome, spec, on_epoch = self._queued.popleft()
        return tag, safe_evaluate(genome, spec, self.cache, "", on_epoch, fused=self.fused, deadline=self.deadline)

    def close(self, now: bool = False) -> None:
        self._queued.clear()
        self.cache = DataCache(self.cache.loader)
