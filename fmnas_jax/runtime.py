"""Process-wide runtime settings: the persistent compilation caches, their hit counter, huge pages, the platform."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax

from fmnas_jax.startup import HUGE_PAGES, with_huge_pages  # noqa: F401  (re-exported: workers and tests use them from here)

_CACHE_EVENTS = {"hits": 0}  # programs this process loaded from a persistent cache instead of compiling them
# What fmnas_jax.pieces records when it loads a compiled piece from its own folder (JAX's own event is counted too).
PIECE_LOADED = "/fmnas_jax/pieces/loaded"
_PIECES: dict[str, Path | None] = {"dir": None}
_THREAD = threading.local()  # JAX's persistent-cache hits of each thread (see jax_cache_hits_here)


def _count_cache_event(event: str, **_: object) -> None:
    if event in ("/jax/compilation_cache/cache_hits", PIECE_LOADED):
        _CACHE_EVENTS["hits"] += 1
    if event == "/jax/compilation_cache/cache_hits":
        _THREAD.hits = getattr(_THREAD, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_event)


def cache_hits() -> int:
    """Programs this process loaded from a persistent cache (JAX's, or the compiled pieces') so far."""
    return _CACHE_EVENTS["hits"]


def jax_cache_hits_here() -> int:
    """Programs this thread has loaded from JAX's persistent cache so far (JAX reports a hit on the compiling thread)."""
    return getattr(_THREAD, "hits", 0)


def pieces_dir() -> Path | None:
    """Where compiled pieces are kept between processes (fmnas_jax.pieces), or None to keep them in memory only."""
    return _PIECES["dir"]


def enable_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent cache for every program (the 1 s default skips small steps), and keep the compiled
    pieces of every genome in `path`/pieces: a process loads a piece compiled by an earlier one without tracing it."""
    os.makedirs(path, exist_ok=True)
    _PIECES["dir"] = Path(path) / "pieces"
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
