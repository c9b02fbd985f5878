"""Team-scale faults: the store opened by many processes at once, the tracking server and its database
restarting mid-search, jobs requeued on another machine, two machines on one search, a full artifact store.

Real services on 127.0.0.1 (free ports), started and stopped by the tests; real searches through the CLI on
the real data (docs/reliability.md has a row per scenario).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import needs_real_data
from mlflow import MlflowClient
from services import HAVE_POSTGRES, MlflowServer, Postgres, wait_until

from fmnas_jax.store import HEARTBEAT, REASON, Store
from fmnas_jax.store.connection import _schema_head

# A real search, small: 3 random genomes, 1 climb evaluation, the winner retrained (~30 s once compiled).
SMOKE = ["+experiment=smoke", "search.budget=1", "backend=inprocess", "progress=false"]


def _launch(cwd: Path, name: str, *args: str, host: str | None = None) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"{name}.log"
    env = os.environ | ({"FMNAS_HOST": host} if host else {})
    proc = subprocess.Popen([sys.executable, "-m", "fmnas_jax", *SMOKE, *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def _finished_evals(uri: str, experiment: str) -> int:
    return sum(r.data.tags.get("fmnas.role") == "evaluation" and r.info.status == "FINISHED" for r in _safe_runs(uri, experiment))


def _assert_consistent(uri: str, experiment: str) -> list:
    """Nothing RUNNING, each evaluation FINISHED exactly once (repeats tagged as duplicates), a finished search."""
    found = _runs(uri, experiment)
    assert [r.info.run_name for r in found if r.info.status == "RUNNING"] == []
    finished = [r for r in found if r.data.tags.get("fmnas.role") == "evaluation" and r.info.status == "FINISHED"]
    keys = Counter(r.data.tags["eval_key"] for r in finished if "fmnas.duplicate_of" not in r.data.tags)
    assert finished and max(keys.values()) == 1, keys
    searches = [r for r in found if r.data.tags.get("fmnas.role") == "search" and r.info.status == "FINISHED"]
    assert searches and all("winner" in s.data.tags for s in searches)
    return found


@pytest.fixture
def server(tmp_path):
    """An MLflow tracking server on SQLite (so the test can stop and start it)."""
    srv = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- 0. a fresh store opened by several processes at once ------------------------------------------------------

OPEN = "import sys; from fmnas_jax.store import Store; print('opened', Store(sys.argv[1], 'fmnas_jax').experiment_id)"
# Another MLflow client that knows nothing of us (a polling script; `mlflow ui` creates the schema the same way).
RAW = "import sys; from mlflow import MlflowClient; print('opened', len(MlflowClient(sys.argv[1]).search_experiments()))"


@pytest.mark.slow
def test_a_fresh_sqlite_store_opened_by_many_processes_at_once(tmp_path):
    for trial in range(2):
        db = tmp_path / f"trial{trial}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for code in [OPEN] * 3 + [RAW]]  # fmt: skip
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs[:3], outs[:3], strict=True):
            assert p.returncode == 0 and out.startswith("opened 1"), err[-2000:]  # all three: one experiment, the same
        with sqlite3.connect(db) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            (version,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
        assert version == _schema_head() and not [t for t in tables if t.startswith("_alembic_tmp")]
        assert not list(tmp_path.glob(".*.creating"))  # no temporary database left behind


# -- 1. the tracking server and its database restart mid-search; down past the bound, the job stops and a rerun resumes --


@pytest.mark.slow
@needs_real_data
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries missing (apt-get install postgresql)")
def test_the_tracking_server_and_its_database_restarting_are_waited_for_and_a_longer_outage_resumes(tmp_path):
    exp, pg = "restart", Postgres()
    server = MlflowServer(pg.uri, tmp_path / "artifacts", tmp_path / "server.log")
    # Two climb steps after the population: the second job is still searching after two new evaluations.
    track = ["tracking=server", f"tracking.uri={server.url}", f"tracking.experiment={exp}", "search.budget=2"]
    try:
        pg.start()
        pg.create_db()
        server.start()
        # Down for longer than tracking.retry_seconds: the job stops, non-zero, naming the URI.
        proc, log = _launch(tmp_path, "first", *track, "tracking.retry_seconds=5")
        wait_until(lambda: _finished_evals(server.url, exp) >= 1 or proc.poll() is not None, 300, "a first finished evaluation")
        finished_before = {r.info.run_id for r in _runs(server.url, exp) if r.info.status == "FINISHED" and r.data.tags.get("eval_key")}
        server.stop()
        text = _finish(proc, log, 120)
        assert proc.returncode != 0, text[-3000:]
        assert f"tracking store {server.url} unusable" in text and "tracking.retry_seconds=5" in text, text[-3000:]

        # The server back: the same command resumes. Mid-search the database restarts under the server (which answers
        # 500s meanwhile), then the server itself restarts: the job waits both out.
        server.start()
        proc, log = _launch(tmp_path, "second", *track, "tracking.retry_seconds=120")
        for outage, (stop, start) in enumerate([(pg.stop, pg.start), (server.stop, server.start)], start=1):
            n = len(finished_before) + outage
            wait_until(lambda n=n: _finished_evals(server.url, exp) >= n or proc.poll() is not None, 300, f"new evaluation {outage}")
            assert proc.poll() is None, "the search ended before its outage"
            stop()
            time.sleep(5)  # down for a while (with its restart, longer): the job keeps calling and waits it out
            start()
        text = _finish(proc, log)
        assert proc.returncode == 0, text[-4000:]
        assert text.count("unreachable") >= 2 and "answers again" in text, text[-4000:]
        found = _assert_consistent(server.url, exp)
        assert finished_before <= {r.info.run_id for r in found if r.info.status == "FINISHED"}  # nothing finished was lost
        killed = [r for r in found if r.info.status == "KILLED"]  # the first job's runs in flight, reaped by the second
        assert all("died" in r.data.tags[REASON] or "interrupted" in r.data.tags[REASON] for r in killed)
    finally:
        server.stop()
        pg.remove()


# -- 2. a job requeued on another machine: heartbeats ---------------------------------------------------------


def test_heartbeats_refresh_while_running_and_stop_at_the_end(tracking_uri):
    store = Store(tracking_uri, "beats", heartbeat_seconds=0.2, heartbeat_timeout=1.0)
    run_id = store.start_run("r", "evaluation", {})
    first = int(store.get_run(run_id).tags[HEARTBEAT])
    wait_until(lambda: int(store.get_run(run_id).tags[HEARTBEAT]) > first, 10, "a refreshed heartbeat")
    store.end_run(run_id)
    time.sleep(0.5)  # a beat in flight may still land
    last = store.get_run(run_id).tags[HEARTBEAT]
    time.sleep(1.5)
    assert store.get_run(run_id).tags[HEARTBEAT] == last  # ended runs get no more beats
    store.close()


def test_runs_whose_heartbeat_stopped_are_reaped_on_any_host_and_live_ones_kept(tracking_uri, monkeypatch):
    monkeypatch.setenv("FMNAS_HOST", "node-b")  # the job that was requeued ran here
    other = Store(tracking_uri, "requeue", heartbeat_seconds=3600, heartbeat_timeout=7200)
    stale = other.start_run("stale", "evaluation", {})
    fresh = other.start_run("fresh", "evaluation", {})
    other.log(stale, tags={HEARTBEAT: str(int(time.time()) - 900)})
    monkeypatch.setenv("FMNAS_HOST", "node-a")  # this job: another machine; pids mean nothing across hosts
    here = Store(tracking_uri, "requeue", heartbeat_timeout=600)
    mine = here.start_run("mine", "evaluation", {})
    here.log(mine, tags={HEARTBEAT: "1"})  # this process's own runs are never reaped, whatever their heartbeat
    assert here.reap_orphans() == [stale]
    reaped = here.get_run(stale)
    assert reaped.status == "KILLED"
    assert "no heartbeat" in reaped.tags[REASON] and "node-b" in reaped.tags[REASON] and "heartbeat_timeout=600" in reaped.tags[REASON]
    assert here.get_run(fresh).status == "RUNNING" and here.get_run(mine).status == "RUNNING"


# -- 3. two machines, one search ------------------------------------------------------------------------------


@pytest.mark.slow
@needs_real_data
def test_two_machines_run_one_search_and_train_each_evaluation_once(tmp_path, server):
    # First, scenario 0 on the server: several processes create one new experiment at the same moment.
    code = OPEN.replace("'fmnas_jax'", "'team'")
    procs = [subprocess.Popen([sys.executable, "-c", code, server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    assert len({out.split()[1] for out, _ in outs}) == 1  # one experiment id for all

    # Evaluations long enough (2 epochs on 4,000 images) that machine-b starts while machine-a is still training.
    track = ["tracking=server", f"tracking.uri={server.url}", "tracking.experiment=twins", "data.train_size=4000", "trainer.epochs=2"]
    a, log_a = _launch(tmp_path, "machine-a", *track, host="machine-a")

    # The second machine picks the job up while the first is training (a requeue, a second array task).
    def a_is_training() -> bool:
        found = _safe_runs(server.url, "twins")
        return any(r.info.status == "RUNNING" and r.data.tags.get("fmnas.role") == "evaluation" for r in found) or a.poll() is not None

    wait_until(a_is_training, 300, "machine-a's first evaluation")
    b, log_b = _launch(tmp_path, "machine-b", *track, host="machine-b")
    text_a, text_b = _finish(a, log_a), _finish(b, log_b)
    assert a.returncode == 0 and b.returncode == 0, text_a[-3000:] + text_b[-3000:]
    found = _assert_consistent(server.url, "twins")
    searches = [r for r in found if r.data.tags.get("fmnas.role") == "search"]
    assert len(searches) == 2 and len({s.data.tags["winner"] for s in searches}) == 1  # the same winner on both
    evals = [r for r in found if r.data.tags.get("fmnas.role") in ("evaluation", "final") and r.info.status == "FINISHED"]
    assert {r.data.tags["fmnas.host"] for r in evals} <= {"machine-a", "machine-b"}
    duplicates = [r for r in evals if "fmnas.duplicate_of" in r.data.tags]
    assert len(duplicates) <= 2, [r.info.run_name for r in duplicates]  # at most the in-flight overlap
    assert "waiting for" in text_b  # machine-b waited for machine-a's evaluations instead of repeating them


def _safe_runs(uri: str, experiment: str) -> list:
    """_runs, or [] while the store is not reachable or not created yet."""
    try:
        return _runs(uri, experiment)
    except Exception:
        return []


# -- 4. the artifact store fills up mid-search ----------------------------------------------------------------


@pytest.mark.slow
@needs_real_data
def test_a_full_artifact_store_fails_the_evaluation_and_a_rerun_resumes(tmp_path):
    artifacts = tmp_path / "mlartifacts"  # where the SQLite store keeps artifacts (beside mlflow.db)
    artifacts.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(artifacts)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        proc, log = _launch(tmp_path, "full")
        wait_until(lambda: _finished_evals(uri, "fmnas_jax") >= 1 or proc.poll() is not None, 300, "a first finished evaluation")
        filler = artifacts / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):  # the disk fills up under the running search
            while True:
                f.write(b"\0" * 4096)
        text = _finish(proc, log)
        assert proc.returncode != 0, text[-3000:]
        assert "could not store artifact" in text and "No space left on device" in text, text[-3000:]
        found = _runs(uri, "fmnas_jax")
        assert not [r for r in found if r.info.status == "RUNNING"]
        failed = [r for r in found if r.info.status == "FAILED" and r.data.tags.get("fmnas.role") in ("evaluation", "final")]
        assert failed and all("could not store artifact" in r.data.tags[REASON] for r in failed)
        finished_before = {r.info.run_id for r in found if r.info.status == "FINISHED" and r.data.tags.get("fmnas.role") == "evaluation"}

        filler.unlink()  # space freed: the same command resumes and trains nothing that had finished
        proc, log = _launch(tmp_path, "freed")
        text = _finish(proc, log)
        assert proc.returncode == 0, text[-3000:]
        found = _assert_consistent(uri, "fmnas_jax")
        assert finished_before <= {r.info.run_id for r in found if r.info.status == "FINISHED"}
        (final,) = [r for r in found if r.data.tags.get("fmnas.role") == "final" and r.info.status == "FINISHED"]
        assert re.fullmatch(r"models:/m-\w+/artifacts/checkpoint\.msgpack", final.data.tags["fmnas.checkpoint"])  # in its logged model
    finally:
        subprocess.run(["umount", "-l", str(artifacts)], capture_output=True)
