"""What the tests share: the CLI as a user runs it (a process, or its entry point in this process), the runs a
job left in its store, results made once per test session, and the lock that gives wall-clock tests the CPU."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from fmnas_jax.genome import Genome, SearchSpace

EXPERIMENT = "fmnas_jax"
# A test-sized real search, for the tests whose subject is a process, a launcher, a server or a cluster rather than
# what a search finds: 2 random genomes and 1 climb step, each 1 epoch on 300 real images, the winner retrained on 300.
TINY = ["+experiment=smoke", "search.population_size=2", "search.budget=1", "data.train_size=300", "data.val_size=200",
        "final.train_size=300"]  # fmt: skip


@dataclass
class Done:
    """A finished CLI job: its exit status and what it printed (subprocess.CompletedProcess's fields)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + "\n" + self.stderr

    @property
    def files(self) -> Path:
        """The run directory the job printed ("Files: ...")."""
        return Path(next(ln.split("Files: ")[1] for ln in self.stdout.splitlines() if ln.startswith("Files: ")))

    def card(self) -> dict:
        return json.loads((self.files / "result_card.json").read_text())


def _checked(done: Done, check: bool) -> Done:
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def cli(cwd: Path, *args: str, check: bool = True, timeout: float = 900) -> Done:
    """`python -m fmnas_jax ARGS progress=false` in a fresh process in `cwd`: for what is about the process itself
    (its exit status as a shell sees it, its restart with huge pages, MLflow's source tags, signals)."""
    proc = subprocess.run([sys.executable, "-m", "fmnas_jax", *args, "progress=false"], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return _checked(Done(proc.returncode, proc.stdout, proc.stderr), check)


def job(cwd: Path, *args: str, check: bool = True) -> Done:
    """The same command through the same entry point (Hydra's main and its config), in this process: no interpreter,
    imports or compilations to pay again. `cwd` is the launch directory (mlflow.db, outputs/). Hydra leaves logging
    alone here (its dictConfig would close pytest's own handlers); the job's log lines go to `stdout` as Hydra's
    console handler sends them."""
    from fmnas_jax.cli import main, quote_values

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = quote_values(["fmnas_jax", *args, "progress=false", "hydra/job_logging=none", "hydra/hydra_logging=none"])
    root, console = logging.getLogger(), logging.StreamHandler(out)
    console.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = root.level
    root.addHandler(console)
    root.setLevel(logging.INFO)
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv = argv
        root.removeHandler(console)
        root.setLevel(level)
    return _checked(Done(code, out.getvalue(), err.getvalue()), check)


def runs(cwd: Path, role: str | None = None, status: str | None = None, experiment: str = EXPERIMENT) -> list:
    """The runs of `cwd`'s mlflow.db, optionally of one fmnas.role and one status ([] before the store exists)."""
    if not (cwd / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # a job that has just created the store has not made its experiment yet
        return []
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if (role is None or r.data.tags.get("fmnas.role") == role) and (status is None or r.info.status == status)]


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a job's launch directory (mlflow.db, its artifacts, its run directories) for a test that writes.
    The store keeps absolute artifact locations, so they are rewritten to the copy's."""
    import sqlite3

    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.lock", "*.log"))
    with sqlite3.connect(dst / "mlflow.db") as con:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                              ("model_versions", "source"), ("model_versions", "storage_location")):  # fmt: skip
            with contextlib.suppress(sqlite3.OperationalError):  # a column this MLflow version does not have
                con.execute(f"UPDATE {table} SET {column} = REPLACE({column}, ?, ?)", (str(src), str(dst)))
    return dst


# -- results made once per test session, shared by pytest-xdist's workers ------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_root(base: Path) -> Path:
    """The folder every worker of this test session sees (pytest-xdist gives each worker its own basetemp below it)."""
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(root: Path, name: str, make: Callable[[Path], None]) -> Path:
    """`root/name`, made by `make(folder)` by the first worker that asks; the others wait for it, then read it."""
    folder, done = root / name, root / f"{name}.done"
    with _flock(root / f"{name}.lock", fcntl.LOCK_EX):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            done.touch()
    return folder


def save(done: Done, folder: Path) -> None:
    (folder / "job.json").write_text(json.dumps({"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}))


def load(folder: Path) -> Done:
    return Done(**json.loads((folder / "job.json").read_text()))


@contextlib.contextmanager
def cpu_share(root: Path, alone: bool) -> Iterator[None]:
    """Tests share the CPU (a shared lock); one whose assertions read the wall clock takes it alone (exclusive). Each
    lock is taken through a turnstile, so a test waiting to run alone gets the CPU as soon as the running ones end."""
    with (root / "cpu.lock").open("a") as lock:
        with _flock(root / "cpu.turnstile", fcntl.LOCK_EX):
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- genomes ---------------------------------------------------------------------------------------------------------


def moves(a: Genome, b: Genome, space: SearchSpace) -> int:
    """One-gene moves between two genomes: kernel +-1, filters one step, another activation, one move each."""
    d = int(a.head_activation != b.head_activation)
    for x, y in zip(a.convs, b.convs, strict=True):
        d += abs(x.kernel - y.kernel) + abs(space.filters.index(x.filters) - space.filters.index(y.filters))
        d += x.activation != y.activation
    return d


def every_genome(space: SearchSpace) -> list[Genome]:
    """Every genome of the space's layout and values, inside its size constraint or not."""
    import itertools

    from fmnas_jax.genome import ConvGene

    genes = [ConvGene(t, f, k, a) for f in space.filters for k in space.kernel_sizes for a in space.activations for t in ("NC", "RC")]
    by_type = {t: [c for c in genes if c.kind == t] for t in ("NC", "RC")}
    return [Genome(cs, h) for cs in itertools.product(*(by_type[t] for t in space.layout)) for h in space.activations]
