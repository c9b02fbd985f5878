"""`backend=ray`: one search's evaluations as Ray tasks over the CPUs and GPUs of a Ray cluster.

The driver (this process) keeps owning the MLflow runs: no node needs to reach the tracking server.
Each data split is loaded once by the driver and put into Ray's object store (a node fetches it once,
its tasks read it without a copy); each evaluation is one task running `safe_evaluate`, the
trainer every backend runs, and a worker process keeps its data placed on its device between tasks.
Ray places tasks by their resources (`num_cpus`, `num_gpus`, fractions of a GPU), retries a task
whose node died on another node (`max_retries`), and `close(now=True)` (Ctrl-C) cancels what is in
flight. A task that still fails is an ordinary FAILED result, trained again by a rerun.

Ray is an optional dependency (`pip install -e '.[ray]'`); nothing here imports it at module level.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from fmnas_jax import data as data_mod
from fmnas_jax.backends.base import (
    BackendError,
    DataCache,
    EpochCallback,
    EvalSpec,
    Loader,
    _Batches,
    cpu_workers,
    safe_evaluate,
    single_threaded_xla,
)
from fmnas_jax.genome import Genome

if TYPE_CHECKING:
    from fmnas_jax.train import EvalResult

log = logging.getLogger("fmnas_jax")
_TASK: dict[str, Any] = {}  # inside a Ray worker process: its data cache, kept between tasks


def _evaluate_task(genome: Genome, spec: EvalSpec, dataset: data_mod.Dataset, cache_dir: str | None) -> tuple[EvalResult, str]:
    """One evaluation inside a Ray worker process: (result, the id of the node it trained on)."""
    import ray

    if not _TASK:
        if cache_dir:
            from fmnas_jax.runtime import enable_compilation_cache

            try:
                os.makedirs(cache_dir, exist_ok=True)
                enable_compilation_cache(cache_dir)
            except OSError as e:  # another node, where the driver's cache path cannot be made: compile without it
                log.warning("no compilation cache on this node (%s)", e)
        _TASK["given"] = {}
        _TASK["cache"] = DataCache(lambda data, seed: _TASK["given"][(data, seed)])
    _TASK["given"] = {(spec.data, spec.seed): dataset}  # what the cache loads if this split is not placed yet
    node = ray.get_runtime_context().get_node_id()
    return safe_evaluate(genome, spec, _TASK["cache"], f" on Ray node {node[:12]}"), node


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise BackendError("backend=ray needs Ray: pip install -e '.[ray]'") from e
    return ray


class Ray(_Batches):
    """Evaluations as Ray tasks on the cluster at `address` (`auto`, `host:port`, or None: a local one).

    `parallelism` is the number of evaluations the cluster's resources hold at once (its CPUs over
    `num_cpus`, its GPUs over `num_gpus`), at most `max_in_flight` when that is set: the scheduler
    keeps that many in flight and the time budget's cost model divides by it."""

    streams_epochs, separate_processes = False, True

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_in_flight: int = 0,
        max_retries: int = 3,
        cache_dir: str | None = None,
        loader: Loader = data_mod.load,
    ) -> None:
        ray = _import_ray()
        self.loader, self.cache_dir = loader, cache_dir
        self._data: dict[tuple, Any] = {}  # (data settings, seed) -> object ref of the loaded split
        self._in_flight: dict[Any, tuple[Any, Genome]] = {}  # object ref -> (tag, genome)
        self._owns = not ray.is_initialized()
        if self._owns:
            local = {} if address else {"num_cpus": cpu_workers()}
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False, **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise BackendError(f"could not reach a Ray cluster at backend.address={address}: {e}") from e
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        slots = min(math.floor(cpus / num_cpus + 1e-9) if num_cpus else 10**6, math.floor(gpus / num_gpus + 1e-9) if num_gpus else 10**6)
        if slots < 1:
            self.close()
            raise BackendError(
                f"the Ray cluster at {address or 'this machine'} has {cpus:g} CPUs and {gpus:g} GPUs: not enough for one evaluation "
                f"with backend.num_cpus={num_cpus:g} and backend.num_gpus={num_gpus:g}"
            )
        self.parallelism = min(slots, max_in_flight) if max_in_flight else slots
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self.description = (
            f"Ray cluster at {address or 'this machine (started for this search)'}: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs; "
            f"{self.parallelism} evaluation(s) in flight, each {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s)"
        )
        env = dict(single_threaded_xla(os.environ)) if num_cpus <= 1 and not num_gpus else {}
        if num_gpus:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several evaluations share a GPU: none grabs most of its memory
        else:
            env["JAX_PLATFORMS"] = "cpu"
        from fmnas_jax.runtime import with_huge_pages

        if tunables := (with_huge_pages(os.environ) or os.environ).get("GLIBC_TUNABLES"):  # huge pages, as this process has
            env["GLIBC_TUNABLES"] = tunables
        self._task = ray.remote(_evaluate_task).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False, runtime_env={"env_vars": env}
        )

    def _data_ref(self, spec: EvalSpec) -> Any:
        ray = _import_ray()
        key = (spec.data, spec.seed)
        if key not in self._data:
            if len(self._data) >= 4:  # a few splits at most (rungs, the final budget), as DataCache keeps
                self._data.clear()
            dataset = self.loader(spec.data, spec.seed)
            log.info("data: %s (into Ray's object store)", dataset.summary())
            self._data[key] = ray.put(dataset)
        return self._data[key]

    def submit(self, tag: Any, genome: Genome, spec: EvalSpec, on_epoch: EpochCallback | None = None) -> None:
        ref = self._task.remote(genome, spec, self._data_ref(spec), self.cache_dir)
        self._in_flight[ref] = (tag, genome)

    def next_result(self, timeout: float | None = None) -> tuple[Any, EvalResult] | None:
        ray = _import_ray()
        from fmnas_jax.train import failed

        if not self._in_flight:
            return None
        ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
        if not ready:
            return None
        tag, genome = self._in_flight.pop(ready[0])
        try:
            result, node = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # its node died more often than max_retries, its worker crashed, it was cancelled
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return tag, failed(genome, f"{type(e).__name__} on the Ray cluster: {first}")
        return tag, dataclasses.replace(result, node=node)

    def close(self, now: bool = False) -> None:
        """Let tasks in flight finish (their results are dropped); with `now` (Ctrl-C) cancel them at once.
        Disconnects from the cluster (and stops it if this backend started it)."""
        ray = _import_ray()
        if not ray.is_initialized():
            return
        if now:
            for ref in self._in_flight:
                ray.cancel(ref, force=True)
        elif self._in_flight:
            ray.wait(list(self._in_flight), num_returns=len(self._in_flight))
        self._in_flight.clear()
        self._data.clear()
        if self._owns:
            ray.shutdown()
