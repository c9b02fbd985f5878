"""Where the test suite's time goes: a pytest plugin that writes one CSV row per test.

    .venv/bin/python -m pytest -n 2 -p bench.suite_profile          # rows to bench/results/suite_profile.csv
    SUITE_PROFILE_CSV=/tmp/p.csv .venv/bin/python -m pytest -n 2 -p bench.suite_profile

Each row: the pytest-xdist worker, the test, its start and end (unix seconds), its wall
seconds, and the CPU seconds of the worker process itself (`self_cpu`) and of the processes it started and reaped
meanwhile (`children_cpu`: CLI jobs, worker pools, servers). On a machine whose cores are all busy, the suite's wall
time is about the sum of the CPU column over the cores: a test that needs less CPU is what makes it faster.
"""

from __future__ import annotations

import csv
import fcntl
import os
import resource
import time
from pathlib import Path

import pytest

COLUMNS = ["worker", "test", "start", "end", "wall_seconds", "self_cpu", "children_cpu"]


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _out() -> Path:
    return Path(os.environ.get("SUITE_PROFILE_CSV", Path(__file__).parent / "results" / "suite_profile.csv"))


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a run without xdist) starts the file
        _out().write_text(",".join(COLUMNS) + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    start, (me0, kids0) = time.time(), _cpu()
    try:
        return (yield)
    finally:
        end, (me1, kids1) = time.time(), _cpu()
        row = [os.environ.get("PYTEST_XDIST_WORKER", "-"), item.nodeid, f"{start:.2f}", f"{end:.2f}", f"{end - start:.1f}",
               f"{me1 - me0:.1f}", f"{kids1 - kids0:.1f}"]  # fmt: skip
        with _out().open("a", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the workers append to one file
            csv.writer(f).writerow(row)
