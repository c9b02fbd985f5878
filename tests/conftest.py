"""Shared fixtures. Tests run on CPU; the real dataset is used where a test says so.

Expensive results are made once per test session and read by every test that only reads them (`smoke`: one
real smoke search through a fresh CLI process; `trained`: one `+experiment=train` run, its weights registered as an
MLflow Model). A test that writes to such a store works on its own copy (`helpers.copy_store`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' temporary folders (their SQLite stores, artifacts and run directories) in memory where the machine has a
# tmpfs for it with room to spare (a container's is often 64 MB; a session writes ~300 MB): a store commits several
# times per evaluation, and each commit waits for the disk otherwise. pytest keeps the last three sessions' there too.
if os.access("/dev/shm", os.W_OK) and (shm := os.statvfs("/dev/shm")).f_bavail * shm.f_frsize >= 2**31:
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", "/dev/shm")
# Each pytest-xdist worker has one core of its own, as a worker of the pool does: XLA's kernels on the calling thread
# (two workers' thread pools contending for two cores cost more than they gain), and the same programs as the pool's
# workers, so a piece compiled by either is loaded by the other. (One process, -n 0, keeps XLA's threads.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    from fmnas_jax.backends.base import single_threaded_xla

    os.environ.update(single_threaded_xla(os.environ))
# JAX's persistent compilation cache, as the CLI uses it (the same folder): a program compiled once, by any test, any
# job or worker process, or an earlier run of the suite, is loaded instead of compiled again.
from fmnas_jax.caches import cache_home
from fmnas_jax.runtime import enable_compilation_cache

enable_compilation_cache(str(cache_home() / "jax"))
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "alone: reads the wall clock, so it runs with no other test on the CPU (pytest-xdist)")
    if not REAL_DATA.is_dir():
        # CI installs dataset-fashion-mnist; a machine without it skips the real-data tests loudly.
        config.issue_config_time_warning(pytest.PytestWarning(f"{REAL_DATA} missing: real-data tests will be skipped"), 2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, the `alone` ones last (in their files' order otherwise): pytest-xdist hands tests to its
    workers in this order, so the long ones start early and the short ones fill both cores, and a test that needs the
    CPU to itself waits for a short test to end, not a long one, and leaves the other core nothing it could do anyway."""
    items.sort(key=lambda item: (item.get_closest_marker("alone") is not None, item.get_closest_marker("slow") is None))


needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="install dataset-fashion-mnist (apt) for real-data tests")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder that every pytest-xdist worker of this session sees."""
    from helpers import shared_root

    return shared_root(tmp_path_factory.getbasetemp())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under pytest-xdist, a test marked `alone` (its assertions read the wall clock) waits until it has the CPU to
    itself, its fixtures' setup and teardown included; the other tests share it."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:  # one process: every test is alone
        return (yield)
    from helpers import cpu_share

    root = Path(tempfile.gettempdir()) / f"fmnas-tests-{uid}"
    root.mkdir(exist_ok=True)
    with cpu_share(root, alone=item.get_closest_marker("alone") is not None):
        return (yield)


# Under pytest-xdist, each worker first makes its share of the shared results, so that they are made side by side
# rather than one worker waiting for another's (only those some selected test reads).
MADE_BY = {"gw0": ("smoke",), "gw1": ("halving", "trained")}


@pytest.fixture(scope="session", autouse=True)
def _shared_results_made_side_by_side(request: pytest.FixtureRequest) -> None:
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for name in MADE_BY.get(os.environ.get("PYTEST_XDIST_WORKER", ""), ()):
        if name in wanted:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def smoke(shared: Path):
    """One real smoke search (`python -m fmnas_jax +experiment=smoke` in a fresh process): its folder and what it printed.
    Read-only: a test that writes copies it first."""
    from helpers import cli, load, once, save

    def make(folder: Path) -> None:
        save(cli(folder, "+experiment=smoke", "tracking.system_metrics_seconds=1"), folder)

    folder = once(shared, "smoke", make)
    return folder, load(folder)


@pytest.fixture(scope="session")
def trained(shared: Path):
    """One `+experiment=train` run of the paper's genome (1 epoch on 3,000 images), its weights a registered MLflow Model
    (fmnas-winner version 1): its folder and what it printed. Read-only."""
    from helpers import job, load, once, save

    def make(folder: Path) -> None:
        save(job(folder, "+experiment=train", f"genome={PAPER}", "trainer.epochs=1", "data.train_size=3000", "data.val_size=1000"),
             folder)  # fmt: skip

    folder = once(shared, "trained", make)
    return folder, load(folder)


# A small multi-fidelity search (synchronous halving, two rungs), in this process.
HALVING = ["+experiment=smoke", "search/fidelity=halving", "search.fidelity.rungs=[{epochs: 1, train_size: 300}]",
           "search.population_size=6", "search.budget=4", "search.seed=7", "trainer.epochs=2", "backend=inprocess"]  # fmt: skip


@pytest.fixture(scope="session")
def halving(shared: Path):
    """One `HALVING` search: its folder and what it printed. Read-only."""
    from helpers import job, load, once, save

    folder = once(shared, "halving", lambda f: save(job(f, *HALVING), f))
    return folder, load(folder)
