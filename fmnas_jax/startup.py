"""What a process settles before its heavy imports: glibc's huge pages, which glibc reads only at process start.

Light on purpose (no jax, no mlflow): `python -m fmnas_jax` restarts itself here, before it imports anything
that would have to be imported again after the restart.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

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


def restart_with_huge_pages() -> None:
    """On Linux, run this same command again (the same pid: Ctrl-C and kill -9 behave as before) with huge pages
    in GLIBC_TUNABLES, unless it has them or the user chose otherwise; returns only when no restart is needed."""
    env = with_huge_pages(os.environ) if sys.platform.startswith("linux") else None
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
