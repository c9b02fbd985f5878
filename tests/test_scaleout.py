"""A team's setup: PostgreSQL behind an MLflow tracking server on loopback, and Hydra's launchers.

Starts its own services on 127.0.0.1 (free ports), and stops them whatever happens.
"""

import pytest
from conftest import needs_real_data
from helpers import TINY, cli
from mlflow import MlflowClient
from services import HAVE_POSTGRES, MlflowServer, Postgres

pytestmark = [pytest.mark.slow, needs_real_data]


@pytest.fixture
def tracking_server(tmp_path):
    if not HAVE_POSTGRES:
        pytest.skip("PostgreSQL server binaries missing (apt-get install postgresql)")
    pg = Postgres()
    server = MlflowServer(pg.uri, tmp_path / "artifacts", tmp_path / "mlflow-server.log", workers=2)
    try:
        pg.start()
        pg.create_db()
        server.start()
        yield server.url
    finally:
        server.stop()
        pg.remove()


def test_joblib_multirun_against_mlflow_server_on_postgresql(tmp_path, tracking_server):
    work = tmp_path / "work"
    work.mkdir()  # each of the two jobs trains on its own worker pool (the default backend), inside a joblib process
    cli(work, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "tracking=server", f"tracking.uri={tracking_server}",
        "search.seed=0,1")  # fmt: skip
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
    from fmnas_jax.inference import load_run

    model = load_run(winner.info.run_id, tracking_uri=tracking_server)  # the weights, through the server, from the logged model
    assert str(model.genome) == winner.data.tags["genome"]


def test_submitit_local_launcher(tmp_path):
    cli(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY, "search.seed=0,1", "backend=inprocess")
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
