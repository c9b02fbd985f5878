"""A team's setup: PostgreSQL behind an MLflow tracking server on loopback, and Hydra's launchers.

Starts its own services on 127.0.0.1 (free ports), and stops them whatever happens.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import needs_real_data
from mlflow import MlflowClient
from test_e2e import cli

pytestmark = [pytest.mark.slow, needs_real_data]
PG_BIN = (
    next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
    if Path("/usr/lib/postgresql").exists()
    else None
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str, **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root; run its tools as the 'postgres' user when we are root."""
    if os.geteuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--", *cmd)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture
def tracking_server(tmp_path):
    if PG_BIN is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries missing (apt-get install postgresql)")
    # pytest's tmp_path is private to root; PostgreSQL runs as 'postgres' and needs its own folder.
    pg_root = Path(tempfile.mkdtemp(prefix="fmnas-pg-"))
    pgdata, sock = pg_root / "data", pg_root / "sock"
    pgdata.mkdir(), sock.mkdir()
    if os.geteuid() == 0:
        for p in (pg_root, pgdata, sock):
            shutil.chown(p, "postgres")
    pg_port, ml_port = _free_port(), _free_port()
    _as_postgres(str(PG_BIN / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust")
    opts = f"-p {pg_port} -k {sock} -c listen_addresses=127.0.0.1"
    _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-o", opts, "-l", str(pg_root / "pg.log"), "-w", "start")
    server = None
    try:
        _as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow")
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        log = (tmp_path / "mlflow-server.log").open("w")
        server = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{ml_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not come up:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
        yield url
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop")
        shutil.rmtree(pg_root, ignore_errors=True)


def test_joblib_multirun_against_mlflow_server_on_postgresql(tmp_path, tracking_server):
    work = tmp_path / "work"
    work.mkdir()
    cli(work, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=smoke", "tracking=server",
        f"tracking.uri={tracking_server}", "search.seed=0,1")  # fmt: skip
    assert not (work / "mlflow.db").exists()  # nothing went to a local SQLite file
    client = MlflowClient(tracking_server)
    exp = client.get_experiment_by_name("fmnas_jax")
    found = client.search_runs([exp.experiment_id], max_results=1000)
    searches = [r for r in found if r.data.tags.get("fmnas.role") == "search"]
    evals = [r for r in found if r.data.tags.get("fmnas.role") == "evaluation"]
    assert len(searches) == 2 and all(r.info.status == "FINISHED" for r in searches)
    assert evals and all(r.info.status == "FINISHED" and "val_accuracy" in r.data.metrics for r in evals)
    for s in searches:
        arts = {a.path for a in client.list_artifacts(s.info.run_id, "report")}
        assert {"report/params_vs_accuracy.png", "report/results.csv", "report/result_card.json"} <= arts
    winner = client.get_run(searches[0].data.tags["winner_run_id"])
    assert winner.data.tags["fmnas.role"] == "final" and winner.info.status == "FINISHED"
    assert "model/checkpoint.msgpack" in {a.path for a in client.list_artifacts(winner.info.run_id, "model")}


def test_submitit_local_launcher(tmp_path):
    cli(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "+experiment=smoke", "search.seed=0,1")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fmnas_jax")
    searches = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("fmnas.role") == "search"]
    assert sorted(r.data.params["search.seed"] for r in searches) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in searches)


def test_slurm_gpu_launcher_config_composes():
    from hydra import compose, initialize_config_module

    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "+experiment=paper"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
