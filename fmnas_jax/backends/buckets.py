"""`Buckets`: the genomes asked for together train in masked buckets (fmnas_jax.batched), one vmapped
program per bucket; opt-in, meant for GPUs.
"""

from __future__ import annotations

import collections
import logging
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fmnas_jax import data as data_mod
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult

from fmnas_jax.backends.base import DataCache, EpochCallback, EvalSpec, Loader, _Batches

log = logging.getLogger("fmnas_jax")


class Buckets(_Batches):
    """Masked buckets on one device: the genomes asked for together are grouped (`plan_buckets`:
    up to `max_models` per bucket, compute within `max_waste` x the genomes alone) and each bucket
    trains as one vmapped program. On XLA:CPU vmapped convolutions are slower than one model at a time."""

    streams_epochs, separate_processes = False, False

    def __init__(self, device: Any, max_models: int = 16, max_waste: float = 2.0, loader: Loader = data_mod.load) -> None:
        from fmnas_jax.config import check_bucket_limits

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
