"""Where genomes are trained: one `Backend` interface (`base`), five implementations, one data cache.

- `InProcess` (`inprocess`): one at a time in this process (epochs stream to the caller).
- `Workers` (`workers`): one pinned single-threaded process per CPU core.
- `Devices` (`devices`): several evaluations in flight per accelerator, one thread each.
- `Buckets` (`buckets`): the genomes asked for together train in masked buckets, one vmapped program each.
- `Ray` (`ray_tasks`, `backend=ray`): evaluations as Ray tasks over a Ray cluster's CPUs and GPUs.

Each gives the same `EvalResult` for a genome and turns an exception into a FAILED result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fmnas_jax import data as data_mod
from fmnas_jax.backends.base import (
    ACCELERATOR_SLOTS,
    Backend,
    BackendError,
    DataCache,
    EpochCallback,
    EvalSpec,
    Loader,
    OnEpoch,
    cpu_workers,
    safe_evaluate,
    single_threaded_xla,
)
from fmnas_jax.backends.buckets import Buckets
from fmnas_jax.backends.devices import Devices
from fmnas_jax.backends.inprocess import InProcess
from fmnas_jax.backends.workers import Workers

__all__ = ["ACCELERATOR_SLOTS", "Backend", "BackendError", "Buckets", "DataCache", "Devices", "EpochCallback", "EvalSpec", "InProcess",
           "Loader", "OnEpoch", "Workers", "choose_backend", "cpu_workers", "opened", "safe_evaluate", "single_threaded_xla"]  # fmt: skip


def choose_backend(cfg: Any, cache_dir: str | None = None, loader: Loader = data_mod.load) -> Backend:
    """The backend `cfg` (a config.BackendConfig) names; for `auto`, the fastest path for this platform
    (its `description` says which, for the log).

    auto: accelerators get `per_device` evaluations in flight per device (a small CNN alone leaves a GPU idle
    between kernel launches, and compiles overlap too); several CPU devices (JAX_NUM_CPU_DEVICES) one
    evaluation per device; one multi-core CPU one single-threaded worker process per core (`workers`, 0 = all).
    """
    import jax

    from fmnas_jax.runtime import platform_summary

    if cfg.kind == "ray":
        from fmnas_jax.backends.ray_tasks import Ray

        return Ray(cfg.address, cfg.num_cpus, cfg.num_gpus, cfg.max_in_flight, cfg.max_retries, cache_dir, loader)
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
