"""Crash safety and shared stores, through the real CLI on the real data (see docs/reliability.md).

What is killed or interrupted is a real `python -m fmnas_jax` process; the reruns and references call the same entry
point in this process (`helpers.job`)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import HALVING, needs_real_data
from helpers import TINY, job, runs
from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, needs_real_data]
SEARCH = ["+experiment=smoke"]  # conftest's shared smoke search: the uninterrupted reference


def _evals(db: Path, status: str) -> int:
    """Evaluation runs with this status in the SQLite store (0 before the schema exists)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            q = (
                "SELECT COUNT(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                "WHERE t.key = 'fmnas.role' AND t.value = 'evaluation' AND r.status = ?"
            )
            return con.execute(q, (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # schema not created yet


def _winner(cwd: Path) -> str:
    (search,) = [r for r in runs(cwd, "search", "FINISHED")]
    return search.data.tags["winner"]


def _kill_9_when(cwd: Path, args: list[str], ready, what: str) -> None:
    """Start a search and SIGKILL its process group (the main process and its workers) once `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "fmnas_jax", *args, "progress=false"], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"the search ended before {what}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_then_rerun_finishes_without_retraining(tmp_path, smoke):
    reference, crashed = smoke[0], tmp_path

    _kill_9_when(crashed, SEARCH, lambda: _evals(crashed / "mlflow.db", "FINISHED") >= 2, "it could be killed")
    before = {r.info.run_id for r in runs(crashed, "evaluation", "FINISHED")}
    left_running = {r.info.run_id for r in runs(crashed) if r.info.status == "RUNNING"}
    assert before and left_running  # killed mid-search: some results, some runs in flight

    job(crashed, *SEARCH)
    after = runs(crashed, "evaluation", "FINISHED")
    keys = Counter(r.data.tags["eval_key"] for r in after)
    assert max(keys.values()) == 1  # exactly one FINISHED run per eval_key
    assert before <= {r.info.run_id for r in after}  # nothing that had finished was retrained
    client = MlflowClient(f"sqlite:///{crashed / 'mlflow.db'}")
    for rid in left_running:
        run = client.get_run(rid)
        assert run.info.status == "KILLED" and "died" in run.data.tags["fmnas.reason"]
    assert _winner(crashed) == _winner(reference)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_worker_pool_at_once(tmp_path, how):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it), or SIGTERM to the job's process (as `kill`,
    systemd or a cluster scheduler stop it), during long evaluations on two worker processes: the search exits
    without waiting for them, leaves no process behind and no run RUNNING; the evaluations in flight and the
    search end KILLED."""
    args = ["+experiment=smoke", "search.population_size=4", "trainer.epochs=200", "data.train_size=5000", "backend=workers",
            "backend.workers=2"]  # fmt: skip
    log = (tmp_path / "log.txt").open("w")
    # SIGINT as a terminal's foreground job has it: a test run started in the background (`pytest &` in a script) ignores
    # SIGINT, children inherit that, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen([sys.executable, "-m", "fmnas_jax", *args, "progress=false"], cwd=tmp_path, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509  # fmt: skip
    deadline = time.time() + 300
    while _evals(tmp_path / "mlflow.db", "RUNNING") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None and _evals(tmp_path / "mlflow.db", "RUNNING") >= 2
    time.sleep(8)  # the workers are inside training now (each evaluation takes minutes)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)  # waiting for the evaluations instead would take minutes
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the search did not stop within 90 s of {how}")
    log.close()
    assert rc == (130 if how == "ctrl-c" else 143)
    out = (tmp_path / "log.txt").read_text()
    assert "run the same command again to resume" in out and "Traceback" not in out
    for _ in range(50):  # the workers were terminated with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the search")
    evals = runs(tmp_path, "evaluation")
    assert not [r for r in evals if r.info.status == "RUNNING"]
    killed = [r for r in evals if r.info.status == "KILLED"]
    assert len(killed) >= 2 and all("interrupted" in r.data.tags["fmnas.reason"] for r in killed)
    assert [r.info.status for r in runs(tmp_path, "search")] == ["KILLED"]


def test_divergence_is_a_failed_run_and_the_search_goes_on(tmp_path):
    job(tmp_path, "+experiment=smoke", "trainer.learning_rate=1e4", "trainer.schedule=constant", "final.learning_rate=0.003",
        "backend=inprocess")  # fmt: skip
    failed = runs(tmp_path, "evaluation", "FAILED")
    assert failed and all("diverged" in r.data.tags["fmnas.reason"] for r in failed)
    (search,) = runs(tmp_path, "search", "FINISHED")
    assert search.data.metrics["failed_evaluations"] == len(failed)


def test_same_seed_same_search(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cards = []
    for d in (a, b):
        run_dir = job(d, *TINY, "backend=inprocess").files
        cards.append((json.loads((run_dir / "climb_path.json").read_text()), json.loads((run_dir / "result_card.json").read_text())))
    (path_a, card_a), (path_b, card_b) = cards
    assert path_a == path_b
    for k in ("genome", "params", "train_accuracy", "val_accuracy", "test_accuracy", "eval_key"):
        assert card_a[k] == card_b[k], k


def _rung_runs(db: Path, rung: str, status: str) -> int:
    """Evaluation runs of one fidelity rung with this status (0 before the schema exists)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            q = ("SELECT COUNT(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                 "WHERE t.key = 'fmnas.rung' AND t.value = ? AND r.status = ?")  # fmt: skip
            return con.execute(q, (rung, status)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_during_rung_1_then_rerun_reuses_rung_0(tmp_path, halving):
    """A multi-fidelity search killed while its first promoted genomes train at rung 1: the rerun
    retrains no rung-0 (or any finished) evaluation and ends on the uninterrupted search's winner."""
    reference, crashed = halving[0], tmp_path
    _kill_9_when(crashed, HALVING, lambda: _rung_runs(crashed / "mlflow.db", "1", "RUNNING") >= 1, "it reached rung 1")
    rung0 = {r.info.run_id for r in runs(crashed, "evaluation", "FINISHED") if r.data.tags.get("fmnas.rung") == "0"}
    assert len(rung0) == 6  # the whole population had been screened at rung 0

    job(crashed, *HALVING)
    after = runs(crashed, "evaluation", "FINISHED")
    assert {r.info.run_id for r in after if r.data.tags.get("fmnas.rung") == "0"} >= rung0
    assert max(Counter(r.data.tags["eval_key"] for r in after).values()) == 1  # no (genome, rung) trained twice
    assert _winner(crashed) == _winner(reference)


# A tiny time-budgeted search with asynchronous halving (the main job's shape, on a few thousand images).
TIMED = ["+experiment=hillclimb", "search.time_budget=50", "search.population_size=6", "data.train_size=2000",
         "search.fidelity.rungs=[{epochs: 1, train_size: 500}, {epochs: 1, train_size: 1000}]", "trainer.epochs=1",
         "final.epochs=2", "final.train_size=2000", "search.seed=4"]  # fmt: skip


def _trained_seconds(cwd: Path) -> float:
    """Wall seconds of every evaluation and retrain that ran (finished, failed or killed), from the store."""
    return sum(r.data.metrics.get("perf/wall_seconds", 0.0) for r in runs(cwd) if r.data.tags.get("fmnas.role") in ("evaluation", "final"))


@pytest.mark.alone
def test_a_time_budget_holds_across_a_kill_9_and_the_finished_search_run_again_trains_nothing(tmp_path):
    """A 50-second budget for search and retrain (startup excluded) is kept across attempts: the resumed attempt is
    charged what the killed one spent. A stored result costs no training time, but the finished search run again must
    not get the whole budget again: it replays what it stored, reuses the retrained winner and keeps the winner."""
    # Killed mid-population (3 of its 6), so that the rerun has time left beyond what any attempt spends anyway
    # (start, store, retrain, report: ~15 s, more on a busy machine), which no budget can make shorter.
    _kill_9_when(tmp_path, TIMED, lambda: _evals(tmp_path / "mlflow.db", "FINISHED") >= 3, "it could be killed")
    killed_at = time.time() * 1000
    job(tmp_path, *TIMED)
    first, second = searches = sorted(runs(tmp_path, "search"), key=lambda r: r.info.start_time)
    assert (first.info.status, second.info.status) == ("KILLED", "FINISHED")
    evals = runs(tmp_path, "evaluation", "FINISHED")
    assert len(evals) > 6  # together they used the time: they climbed beyond the population
    assert max(Counter(r.data.tags["eval_key"] for r in evals).values()) == 1
    assert _trained_seconds(tmp_path) <= 50 * 2 * 1.1  # two slots' worth of the 50-second budget, with a margin
    spent = [r.data.metrics.get("elapsed_seconds", 0.0) for r in searches]
    assert sum(spent) <= 50 * 1.2, spent  # the attempts' wall-clock time together, search and retrain, as they count it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # and as the store's clock and this test's see it
    ends = [client.get_run(r.info.run_id).info.end_time for r in [*evals, *runs(tmp_path, "final", "FINISHED")]]
    wall = (killed_at - first.info.start_time) + (max(ends) - second.info.start_time)
    assert wall / 1000 <= 50 * 1.25, wall / 1000

    winner, every_eval = second.data.tags["winner"], len(runs(tmp_path, "evaluation"))
    rerun = job(tmp_path, *TIMED)
    assert len(runs(tmp_path, "evaluation")) == every_eval and len(runs(tmp_path, "final")) == 1  # nothing trained
    third = max(runs(tmp_path, "search", "FINISHED"), key=lambda r: r.info.start_time)
    assert third.info.run_id != second.info.run_id
    assert third.data.metrics["new_evaluations"] == 0 and third.data.tags["winner"] == winner
    assert "replaying it" in rerun.stderr + rerun.stdout
