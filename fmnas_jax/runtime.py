"""Process-wide runtime settings: the persistent compilation cache, its hit counter, huge pages, the platform."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

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


# glibc's malloc backs its mappings with transparent huge pages (THP is 'madvise' on these machines): XLA's
# step buffers were freed and faulted in again every step, 4 KB at a time. Measured on a 2-core AMD EPYC
# (docs/benchmarks.md, wide genome, one pinned worker): 2.4-3.2 M minor faults -> 0.1 M, sys 3.7-4.9 s -> 0.7-0.9 s,
# 990-1,120 -> 1,540 images/s, the same accuracy. glibc reads GLIBC_TUNABLES only when a process starts.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with HUGE_PAGES added to GLIBC_TUNABLES, or None when it sets glibc.malloc.hugetlb already
    (ours, or the user's choice: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns it off)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (current, HUGE_PAGES) if t)}


def malloc_summary() -> str:
    """What glibc's malloc was told at this process's start (for the log)."""
    return os.environ.get("GLIBC_TUNABLES", "") or "glibc defaults"
