"""Process-wide settings: glibc's huge pages for the processes the package starts, the compilation cache."""

import os
from pathlib import Path

from fmnas_jax.backends import Workers
from fmnas_jax.runtime import HUGE_PAGES, with_huge_pages


def test_huge_pages_are_added_to_glibc_tunables_unless_chosen_already():
    assert with_huge_pages({})["GLIBC_TUNABLES"] == HUGE_PAGES
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES}"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user turned them off: kept
    assert with_huge_pages({"GLIBC_TUNABLES": HUGE_PAGES}) is None


def test_worker_processes_start_with_huge_pages(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    pool = Workers(1, None)
    try:
        pool._started().apply(os.getpid)  # the worker has started
        (pid,) = [p.pid for p in pool._pool._pool]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"GLIBC_TUNABLES={HUGE_PAGES}".encode() in environ
    finally:
        pool.close(now=True)


def test_the_command_line_restarts_for_huge_pages_before_its_heavy_imports():
    """`python -m fmnas_jax` re-executes itself for glibc's tunables; what it imported before that is imported twice."""
    import subprocess
    import sys

    code = "import sys, fmnas_jax.__main__; print(sorted(m for m in ('jax', 'mlflow', 'hydra', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
