"""Process-wide runtime settings: the persistent compilation cache, its hit counter, huge pages, the platform."""

from __future__ import annotations

import os

import jax

from fmnas_jax.startup import HUGE_PAGES, with_huge_pages  # noqa: F401  (re-exported: workers and tests use them from here)

_CACHE_EVENTS = {"hits": 0}  # programs this process loaded from the persistent cache


def _count_cache_event(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_EVENTS["hits"] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def cache_hits() -> int:
    """Programs loaded from JAX's persistent cache by this process so far."""
    return _CACHE_EVENTS["hits"]


def enable_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent cache for every program (the 1 s default skips small steps)."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def platform_summary() -> str:
    """e.g. 'cpu: cpu x1' or 'gpu: NVIDIA H100 80GB HBM3 x1'."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()}: {', '.join(kinds)} x{len(devices)}"


def malloc_summary() -> str:
    """What glibc's malloc was told at this process's start (for the log)."""
    return os.environ.get("GLIBC_TUNABLES", "") or "glibc defaults"
