"""A team's setup: PostgreSQL behind an MLflow tracking server on loopback, and Hydra's launchers.

Starts its own services on 127.0.0.1 (free ports), and stops them whatever happens.
"""

import pytest
from conftest import needs_real_data
from helpers import TINY, cli, runs
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


def test_a_submitit_sweep_of_three_searches_at_once_on_one_fresh_sqlite_store(tmp_path):
    """Hydra's submitit launcher starts three searches at once, each in its own process, on one SQLite store that none
    of them finds: they create it once between them, share what they train, register three winners at once and crown
    the best. (In-process training: three jobs with a worker pool each would be nine processes on the cores; a job's
    pool inside a launcher's process is the joblib test's.)"""
    proc = cli(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY, "search.seed=0,1,2",
               "backend=inprocess")  # fmt: skip
    logs = [p.read_text() for p in tmp_path.glob("multirun/**/.submitit/**/*_log.*")]
    assert len(logs) >= 3  # each job's own output, as submitit kept it
    out = proc.stdout + proc.stderr + "".join(logs)
    assert "database is locked" not in out and "duplicate column" not in out
    searches = runs(tmp_path, "search")
    assert len(searches) == 3 and all(r.info.status == "FINISHED" for r in searches)
    assert sorted(r.data.params["search.seed"] for r in searches) == ["0", "1", "2"]
    assert max(r.info.start_time for r in searches) < min(r.info.end_time for r in searches)  # all three ran at once
    evals = runs(tmp_path, "evaluation")
    assert all(r.info.status == "FINISHED" for r in evals)
    by_key: dict[str, list] = {}
    for r in evals:
        by_key.setdefault(r.data.tags["eval_key"], []).append(r)
    for group in by_key.values():  # a key trained twice keeps one authoritative run; the other is marked
        unmarked = [r for r in group if "fmnas.duplicate_of" not in r.data.tags]
        assert len(unmarked) == 1
    finals = runs(tmp_path, "final", "FINISHED")
    for r in searches:  # every search's card points at a real finished run: its retrained winner
        assert r.data.tags["winner_run_id"] in {e.info.run_id for e in finals}
    registry = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # three registrations at once: the best wears the alias
    versions = registry.search_model_versions("name = 'fmnas-winner'")
    champion = registry.get_model_version_by_alias("fmnas-winner", "champion")
    assert len(versions) == 3 and float(champion.tags["val_accuracy"]) == max(float(v.tags["val_accuracy"]) for v in versions)


def test_slurm_gpu_launcher_config_composes():
    from hydra import compose, initialize_config_module

    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "+experiment=paper"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
