import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from fmnas_jax.store import Store, StoreError, flatten, resolve_uri


def _eval_run(store, genome, key, budget, status="FINISHED", metrics=None, parent=None):
    rid = store.start_run(genome, "evaluation", {"genome": genome, "eval_key": key, "budget_key": budget}, parent)
    store.log(rid, metrics=metrics or {"val_accuracy": 0.5, "param_count": 100.0}, params={"layer1.kernel": 3})
    store.end_run(rid, status, None if status == "FINISHED" else "boom")
    return rid


def test_round_trip_on_a_temporary_sqlite_file(tracking_uri):
    store = Store(tracking_uri, "exp")
    parent = store.start_run("search", "search", {})
    rid = _eval_run(store, "G1", "k1", "b1", metrics={"val_accuracy": 0.91, "param_count": 16598.0, "test_accuracy": 0.9}, parent=parent)
    store.log(rid, history=[{"train_loss": 1.0}, {"train_loss": 0.5}])  # per-epoch rows at steps 1, 2
    got = store.find_finished("k1")
    assert got is not None and got.run_id == rid and got.genome == "G1" and got.parent_run_id == parent
    assert got.metric("val_accuracy") == pytest.approx(0.91) and got.metric("param_count") == 16598
    hist = MlflowClient(tracking_uri).get_metric_history(rid, "train_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5)]
    assert store.find_finished("nope") is None
    # a second Store on the same file sees the same experiment and data
    assert Store(tracking_uri, "exp").find_finished("k1").run_id == rid


def test_one_log_call_holds_more_than_one_log_batch_takes(tracking_uri):
    store = Store(tracking_uri, "exp")
    rid = store.start_run("big", "evaluation", {})
    params, tags = {f"p{i}": i for i in range(150)}, {f"t{i}": str(i) for i in range(130)}
    history = [{"a": float(e), "b": -float(e), "c": float("nan")} for e in range(1, 601)]  # 1,200 finite values
    store.log(rid, metrics={"final": 1.0}, params=params, tags=tags, history=history)
    run = MlflowClient(tracking_uri).get_run(rid)
    assert run.data.params == {k: str(v) for k, v in params.items()} and tags.items() <= run.data.tags.items()
    assert run.data.metrics["final"] == 1.0 and "c" not in run.data.metrics
    hist = MlflowClient(tracking_uri).get_metric_history(rid, "b")
    assert sorted((m.step, m.value) for m in hist) == [(e, -float(e)) for e in range(1, 601)]


def test_housekeeping_metrics_are_logged_under_perf_and_read_back_by_their_names(tracking_uri):
    store = Store(tracking_uri, "exp")
    store.log(
        store.start_run("other host", "evaluation", {"genome": "G0", "eval_key": "k0", "budget_key": "b"}), metrics={"wall_seconds": 9.0}
    )  # fmt: skip  (RUNNING: never a sample)
    perf = {"compile_seconds": 1.5, "cache_hits": 2.0, "train_seconds": 3.0, "images_per_second": 4.0, "images_trained": 64.0,
            "wall_seconds": 5.0}  # fmt: skip
    rid = _eval_run(store, "G", "k", "b", metrics={"val_accuracy": 0.8, "param_count": 10.0} | perf)
    logged = MlflowClient(tracking_uri).get_run(rid).data.metrics
    assert {f"perf/{k}" for k in perf} <= set(logged) and not set(perf) & set(logged)  # the Chart view groups them apart
    assert logged["val_accuracy"] == pytest.approx(0.8)  # what the search ranks on keeps its name
    got = store.find_finished("k")
    assert {k: got.metric(k) for k in perf} == pytest.approx(perf)  # the package reads them by their plain names
    from fmnas_jax.store import host_name

    assert store.cost_samples(host_name()) == [("G", 64, pytest.approx(5.0), pytest.approx(3.0))]
    other = store.start_run("G2", "evaluation", {"genome": "G2", "eval_key": "k2", "budget_key": "b2"})  # another dataset's run
    store.log(other, metrics=perf | {"wall_seconds": 50.0}, params={"data.data": "0123abcd"})
    store.end_run(other, "FINISHED")
    assert [g for g, *_ in store.cost_samples(host_name())] == ["G"]  # Fashion-MNIST's runs only: no data digest
    assert store.cost_samples(host_name(), "0123abcd") == [("G2", 64, pytest.approx(50.0), pytest.approx(3.0))]
    old = MlflowClient(tracking_uri).create_run(store.experiment_id, tags={"fmnas.role": "evaluation", "genome": "O", "eval_key": "ko",
                                                                          "budget_key": "b"})  # fmt: skip
    MlflowClient(tracking_uri).log_metric(old.info.run_id, "wall_seconds", 7.0)  # a run logged before the prefix
    MlflowClient(tracking_uri).set_terminated(old.info.run_id)
    assert store.find_finished("ko").metric("wall_seconds") == pytest.approx(7.0)


def test_failed_runs_are_not_results_and_earliest_finished_wins(tracking_uri):
    store = Store(tracking_uri, "exp")
    _eval_run(store, "G", "k", "b", status="FAILED")
    assert store.find_finished("k") is None
    first = _eval_run(store, "G", "k", "b")
    _eval_run(store, "G", "k", "b")
    assert store.find_finished("k").run_id == first
    assert [s.run_id for s in store.finished_evaluations("b")] == [first]
    assert store.finished_evaluations("other") == []


@pytest.mark.slow
def test_finished_evaluations_pages_past_1000_runs(tracking_uri):
    store = Store(tracking_uri, "exp")
    exp = store.experiment_id
    client = MlflowClient(tracking_uri)
    for i in range(1003):
        tags = {"fmnas.role": "evaluation", "genome": f"G{i}", "eval_key": f"k{i}", "budget_key": "b"}
        run = client.create_run(exp, tags=tags)
        client.set_terminated(run.info.run_id)
    assert len(store.finished_evaluations("b")) == 1003


def test_orphans_of_dead_processes_are_marked_killed(tracking_uri):
    store = Store(tracking_uri, "exp")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    rid = store.start_run("G", "evaluation", {"genome": "G", "eval_key": "k", "budget_key": "b", "fmnas.pid": dead.stdout.strip()})
    mine = store.start_run("G2", "evaluation", {"genome": "G2", "eval_key": "k2", "budget_key": "b"})
    assert store.reap_orphans() == [rid]
    run = store.get_run(rid)
    assert run.status == "KILLED" and "died" in run.tags["fmnas.reason"]
    assert store.get_run(mine).status == "RUNNING"


def test_default_uri_is_mlflow_db_in_the_launch_dir(tmp_path):
    assert resolve_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///x/y.db", str(tmp_path)) == f"sqlite:///{tmp_path / 'x/y.db'}"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_location_is_refused_nonroot(tmp_path):
    tmp_path.chmod(0o500)
    with pytest.raises(StoreError, match="not writable"):
        Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(f"sqlite:///{tmp_path / 'no' / 'mlflow.db'}", "exp")
    assert not (tmp_path / "no").exists()


def test_flatten():
    assert flatten("", {"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_records_are_typed_and_none_params_are_left_out(tracking_uri):
    store = Store(tracking_uri, "exp")
    rid = store.start_evaluation("G", "k", "b", None, {"data.train_size": None, "data.val_size": 500}, rung=1)
    store.log(rid, metrics={"test_accuracy": 0.5})
    store.end_run(rid)
    run = store.get_run(rid)
    assert (run.status, run.role, run.name, run.parent_run_id, run.checkpoint) == ("FINISHED", "evaluation", "G", None, None)
    assert run.params == {"data.val_size": "500"} and run.tags["fmnas.rung"] == "1"
    assert run.int_param("data.train_size") is None and run.int_param("data.val_size") == 500 and run.metric("test_accuracy") == 0.5


def test_a_new_experiment_opens_in_the_ui_as_model_training(tracking_uri):
    store = Store(tracking_uri, "exp")
    assert store.client.get_experiment(store.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert store.ui_link().endswith(f"/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning")
    # every link the project writes opens model-training mode: one run's page, a filtered runs table
    assert store.view("abc") == f"#/experiments/{store.experiment_id}/runs/abc?workflowType=machine_learning"
    link = store.view(search_filter="tags.`fmnas.rung` = '0'")
    query = "searchFilter=tags.%60fmnas.rung%60%20%3D%20%270%27&workflowType=machine_learning"
    assert link == f"#/experiments/{store.experiment_id}/runs?{query}"
    assert urllib.parse.parse_qs(link.split("?", 1)[1])["searchFilter"] == ["tags.`fmnas.rung` = '0'"]
    rid = store.start_run("r", "evaluation", {})
    store.log(rid, metrics={"test_accuracy": float(np.float32(0.8953))})
    assert store.get_run(rid).metric("test_accuracy") == 0.8953  # no float32 noise in the UI


def test_the_champion_alias_follows_the_best_validation_accuracy(tracking_uri, tmp_path):
    from fmnas_jax.store.models import crown_if_best

    store = Store(tracking_uri, "exp")
    client, name = store.client, "fmnas-alias-test"
    client.create_registered_model(name)
    (tmp_path / "m").mkdir()
    moved = []
    for val in ("0.9000", "0.8800", "0.9100", "not a number"):
        v = client.create_model_version(name, str(tmp_path / "m"), tags={"val_accuracy": val})
        moved.append(crown_if_best(client, name, str(v.version)))
    assert moved == [True, False, True, False]  # a worse (or unreadable) version never takes it
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"


def test_a_worse_champion_written_late_by_another_process_is_replaced(tracking_uri, tmp_path):
    from fmnas_jax.store.models import crown_if_best

    client, name = Store(tracking_uri, "exp").client, "fmnas-late-test"
    client.create_registered_model(name)
    (tmp_path / "m").mkdir()
    for val in ("0.90", "0.95", "0.85"):
        client.create_model_version(name, str(tmp_path / "m"), tags={"val_accuracy": val})
    client.set_registered_model_alias(name, "champion", "1")  # a process that read before version 2 existed
    assert crown_if_best(client, name, "3") is False
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def _crown_together(uri: str, name: str, versions: list[str]) -> list[Exception]:
    """crown_if_best for each version in its own thread and client (as the processes of a multirun), all at once."""
    import threading

    from fmnas_jax.store.models import crown_if_best

    start, errors = threading.Barrier(len(versions)), []

    def crown(version: str) -> None:
        own = MlflowClient(uri, registry_uri=uri)
        start.wait()
        try:
            crown_if_best(own, name, version)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=crown, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_crowning_on_one_sqlite_store_leaves_the_best_and_raises_nothing(tmp_path):
    """Searches of one multirun register at once: before, two creating the alias together raised a UNIQUE
    constraint error, and a worse version set last kept the alias (8 of 10 such trials failed before the fix)."""
    for trial in range(5):
        uri = f"sqlite:///{tmp_path / f'{trial}.db'}"
        client, name = Store(uri, "exp").client, "fmnas-race-test"
        client.create_registered_model(name)
        (tmp_path / "m").mkdir(exist_ok=True)
        versions = [client.create_model_version(name, str(tmp_path / "m"), tags={"val_accuracy": v}).version
                    for v in ("0.90", "0.95", "0.85", "0.93")]  # fmt: skip
        errors = _crown_together(uri, name, [str(v) for v in versions])
        assert errors == []
        assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_processes_logging_one_new_dataset_at_once_all_record_it(tmp_path):
    """MLflow looks a dataset up, then inserts it: two machines starting their retrain of one winner at the same moment
    both inserted it, and the second failed on the UNIQUE constraint (a whole search ended). Now the loser retries and
    finds the row."""
    import threading

    from fmnas_jax.data import SplitRecord

    def log(store: Store, rid: str, split: SplitRecord, start: threading.Barrier, errors: list) -> None:
        start.wait()
        try:
            store.log_datasets(rid, [split])
        except Exception as e:
            errors.append(e)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Store(uri, "exp")
    for trial in range(4):
        split = SplitRecord("fashion_mnist/train", "training", f"{trial:016x}", "/data", "local", 2000)
        stores = [Store(uri, "exp") for _ in range(6)]
        rids = [s.start_run(f"G{trial}-{i}", "evaluation", {}) for i, s in enumerate(stores)]
        start, errors = threading.Barrier(len(stores)), []
        threads = [threading.Thread(target=log, args=(store, rid, split, start, errors)) for store, rid in zip(stores, rids, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for rid in rids:
            assert [d.dataset.digest for d in MlflowClient(uri).get_run(rid).inputs.dataset_inputs] == [split.digest]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest", "contention"),
        ('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "datasets_pk"', "contention"),
        ("(sqlite3.OperationalError) database is locked", "contention"),
        ("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded (Connection refused)", "unreachable"),
        ("INVALID_PARAMETER_VALUE: Changing param values is not allowed. Param with key='lr' was already logged", None),
    ],
)
def test_which_store_errors_are_retried(text, kind):
    from fmnas_jax.store.connection import transient_kind

    assert transient_kind(Exception(text)) == kind


def _schema(db) -> dict[str, set[str]]:
    """Each table's columns and the indexes of a SQLite store (what MLflow's migrations build)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cols = {t: {r[1] for r in con.execute(f"PRAGMA table_info('{t}')")} for t in tables}
        cols["(indexes)"] = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return cols


def test_mlflows_schema_head_is_found_once_and_kept_beside_the_template(tmp_path, monkeypatch):
    import mlflow.store
    from alembic.script import ScriptDirectory

    from fmnas_jax.store import connection

    truth = ScriptDirectory(str(Path(mlflow.store.__file__).parent / "db_migrations")).get_current_head()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    connection._schema_head.cache_clear()
    try:
        assert connection._schema_head() == truth
        (kept,) = connection.schema_cache().glob("mlflow-*.head")
        assert kept.read_text() == truth
        kept.write_text("Not a revision!\n")  # damaged: found again, and kept again
        connection._schema_head.cache_clear()
        assert connection._schema_head() == truth and kept.read_text() == truth
        kept.write_text("0123abcd4567")  # what is kept is what a process reads, without loading the migrations
        connection._schema_head.cache_clear()
        assert connection._schema_head() == "0123abcd4567"
    finally:
        connection._schema_head.cache_clear()


def test_a_fresh_store_copies_the_schema_template_made_once_by_mlflows_own_migrations(tmp_path, monkeypatch):
    from mlflow.store.db import utils as mlflow_db

    from fmnas_jax.store import connection

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made = []
    real = mlflow_db._initialize_tables
    monkeypatch.setattr(mlflow_db, "_initialize_tables", lambda engine: (made.append(str(engine.url)), real(engine))[1])
    templates = lambda: [url for url in made if "mlflow-schema" in url]  # noqa: E731  (the migrations a template got)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "a")  # MLflow puts its default experiment's artifacts under the folder it runs in
    first = Store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "exp")
    (template,) = connection.schema_cache().glob("mlflow-*.db")  # one per MLflow version, named by it and its schema head
    assert len(made) == 1 and str(template.name) in made[0]  # MLflow migrated the template, not the store
    monkeypatch.chdir(tmp_path / "b")
    second = Store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "exp")
    assert len(made) == 1  # the second store is a copy: no migration ran
    # The copies are what MLflow builds itself on an empty file (tables, columns, indexes, schema version) ...
    MlflowClient(f"sqlite:///{tmp_path / 'plain' / 'mlflow.db'}").search_experiments()
    assert _schema(tmp_path / "b" / "mlflow.db") == _schema(tmp_path / "plain" / "mlflow.db")
    assert connection._schema_version(tmp_path / "b" / "mlflow.db") == connection._schema_head()
    # ... with MLflow's default experiment made where each store was opened (the template holds none), and they work
    for store, folder in ((first, "a"), (second, "b")):
        default = MlflowClient(store.uri).get_experiment("0")
        assert default.name == "Default" and default.artifact_location.startswith(str(tmp_path / folder))
        rid = _eval_run(store, "G", "k", "b")
        assert store.find_finished("k").run_id == rid
    # A damaged template (another MLflow's, a truncated file) is made again, not copied.
    template.write_bytes(b"not a database")
    (tmp_path / "c").mkdir()
    Store(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}", "exp")
    assert len(templates()) == 2 and connection._schema_version(template) == connection._schema_head()


def test_without_a_writable_cache_a_fresh_store_is_migrated_the_plain_way(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    rid = _eval_run(store, "G", "k", "b")
    assert store.find_finished("k").run_id == rid
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
