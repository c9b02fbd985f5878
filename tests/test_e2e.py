"""End to end through the real CLI: real Hydra, real data, a real SQLite MLflow store.

The shared smoke search (conftest's `smoke`) is a fresh `python -m fmnas_jax` process; the other jobs call the same
entry point in this process (`helpers.job`), except where the process is the subject (its exit status).
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import HALVING, PAPER, needs_real_data
from helpers import cli, copy_store, job, runs
from mlflow import MlflowClient

from fmnas_jax.genome import Genome

pytestmark = [pytest.mark.slow, needs_real_data]


def _check_the_ui_views(tmp_path: Path, search, evals: list) -> None:
    """What the MLflow UI shows of a search: names that differ first, fitness and budget on each evaluation,
    the anytime curve on the search run, links that open filtered views in model-training mode."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for r in evals:  # no rungs in the smoke search: "eval", then the genome's short form
        assert r.info.run_name == f"eval {Genome.parse(r.data.tags['genome']).short}"
        assert (r.data.metrics["budget_epochs"], r.data.metrics["budget_images"]) == (1, 1000)
        assert "fitness" in r.data.metrics  # what the search ranked it by
    best = [m.value for m in sorted(client.get_metric_history(search.info.run_id, "best_fitness"), key=lambda m: m.step)]
    assert best and all(b >= a for a, b in itertools.pairwise(best))  # the search's anytime curve never falls
    assert max(best) == pytest.approx(max(r.data.metrics["fitness"] for r in evals))
    counts = [m.value for m in sorted(client.get_metric_history(search.info.run_id, "evaluations_r0"), key=lambda m: m.step)]
    assert counts == list(range(1, len(evals) + 1))
    note = search.data.tags["mlflow.note.content"]
    assert note.count("searchFilter=") == 2 and note.count("workflowType=machine_learning") >= 3
    assert f"searchFilter=tags.mlflow.parentRunId%20%3D%20%27{search.info.run_id}%27" in note
    links = re.findall(r"\]\((#/[^)]*searchFilter=[^)]*)\)", note)
    filters = [urllib.parse.parse_qs(link.split("?", 1)[1])["searchFilter"][0] for link in links]
    selected = [{r.info.run_id for r in client.search_runs([search.info.experiment_id], f)} for f in filters]
    assert selected == [{r.info.run_id for r in evals}, {search.data.tags["winner_run_id"]}]  # MLflow's own search accepts them


def test_smoke_end_to_end_then_rerun_trains_nothing(smoke, tmp_path):
    rerun_dir = tmp_path
    tmp_path, first = smoke  # read only: the rerun below works on a copy
    out = first.text
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in out and "result card" in out
    assert "malloc: glibc.malloc.hugetlb=1" in out  # the CLI restarted itself with glibc's huge pages
    evals = runs(tmp_path, "evaluation")
    assert evals and all(r.info.status == "FINISHED" for r in evals)
    assert len({r.data.tags["eval_key"] for r in evals}) == len(evals)  # one run per eval_key
    (search,) = runs(tmp_path, "search")
    assert search.info.status == "FINISHED" and search.data.params["search.population_size"] == "3"
    assert all(r.data.tags.get("mlflow.parentRunId") == search.info.run_id for r in evals)
    for r in (search, evals[0]):  # what MLflow's fluent API records: the UI's User and Source columns
        assert r.data.tags["mlflow.source.name"].endswith("__main__.py") and r.data.tags["mlflow.source.type"] == "LOCAL"
        assert r.data.tags["mlflow.user"]
    assert 0 <= search.data.metrics["system/cpu_utilization_percentage"] <= 100  # MLflow's system metrics on the search run
    assert search.info.run_name == "s0 hillclimb search"  # what tells searches apart first: the UI shows ~14 characters
    # One meaning per axis: the search run's Step is the evaluations it counted (3 + 2); the retrain adds no step.
    elapsed = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(search.info.run_id, "elapsed_seconds")
    assert max(m.step for m in elapsed) == 5 and len(elapsed) == 6  # 5 evaluations and the retrain's one epoch
    run_dir = first.files
    for name in ("results.csv", "params_vs_accuracy.png", "winner_curves.png", "result_card.md", "result_card.json", "climb_path.json"):
        assert (run_dir / name).stat().st_size > 0, name
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert header.startswith("genome,params,train_accuracy,test_accuracy,val_accuracy")
    card = json.loads((run_dir / "result_card.json").read_text())
    winner = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(card["run_id"])
    assert winner.data.metrics["test_accuracy"] == pytest.approx(card["test_accuracy"])
    assert winner.data.tags["fmnas.role"] == "final" and winner.info.run_name == f"final {Genome.parse(card['genome']).short}"
    assert card["genome"] in winner.data.tags["mlflow.note.content"]  # the run's description in the UI
    splits = {d.dataset.name: d for d in winner.inputs.dataset_inputs}  # the UI's Dataset column
    assert set(splits) == {"fashion_mnist/train", "fashion_mnist/validation", "fashion_mnist/test"}
    assert json.loads(splits["fashion_mnist/test"].dataset.profile)["num_rows"] == 10000
    assert card["genome"] in search.data.tags["mlflow.note.content"] and card["run_id"] in search.data.tags["mlflow.note.content"]
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(search.info.experiment_id)
    assert "parentRunId" in experiment.tags["mlflow.note.content"]  # how to compare within one search, on the experiment page
    assert winner.data.tags["mlflow.parentRunId"] == search.info.run_id
    assert winner.data.tags["fmnas.registered_model"] == "fmnas-winner/1"  # the retrained winner is a registered MLflow Model
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(search.info.run_id, "report")}
    assert "report/params_vs_accuracy.png" in artifacts and "report/results.csv" in artifacts
    _check_the_ui_views(tmp_path, search, evals)

    copy = copy_store(tmp_path, rerun_dir / "copy")
    second = job(copy, "+experiment=smoke", "backend=inprocess")  # the backend is not part of the search
    assert len(runs(copy, "evaluation")) == len(evals) and len(runs(copy, "final")) == 1  # nothing retrained
    assert "0 trained" in second.text
    assert second.card()["genome"] == card["genome"] and second.card()["run_id"] == card["run_id"]


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright drives it (no browser download)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_printed_link_opens_the_runs_in_model_training_mode_in_a_real_browser(smoke):
    """`mlflow ui` on the smoke search's store, the link the job printed, a headless Chromium: the runs table in
    Model-training mode (not GenAI's welcome page), the search by name, and its final run under it."""
    playwright = pytest.importorskip("playwright.sync_api")
    sync_playwright, expect = playwright.sync_playwright, playwright.expect
    from services import TRACKING_ONLY, free_port, wait_until

    tmp_path, first = smoke
    (link,) = re.findall(r"MLflow UI: (http://127\.0\.0\.1:5000/\S+)", first.stdout)
    assert "workflowType=machine_learning" in link
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (search,) = runs(tmp_path, "search")
    winner = MlflowClient(uri).get_run(search.data.tags["winner_run_id"])
    port, log = free_port(), (tmp_path / "ui.log").open("w")
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    ui = subprocess.Popen([mlflow_cli, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=TRACKING_ONLY)  # fmt: skip
    try:

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return ui.poll() is not None

        wait_until(up, 120, "mlflow ui")
        assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])  # root in CI: no sandbox
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})  # a fresh profile: no remembered mode
                page.goto(link.replace(":5000/", f":{port}/"))
                name = page.get_by_text(search.info.run_name, exact=True).first
                name.wait_for(timeout=60_000)  # the runs table, with the search by its name
                assert "workflowType=machine_learning" in page.url
                # expect() waits for the page to settle (is_visible() does not: the heading once came after the table)
                expect(page.get_by_text("Model training").first).to_be_visible(timeout=30_000)
                expect(page.get_by_role("heading", name="Runs").first).to_be_visible(timeout=30_000)
                expect(page.get_by_text("Welcome to MLflow")).to_have_count(0)
                page.locator(f'[row-id="{search.info.run_id}"] button').first.click()  # expand the search: its runs nest under it
                page.get_by_text(winner.info.run_name, exact=True).first.wait_for(timeout=30_000)
            finally:
                browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_train_experiment_with_the_readme_genome(trained):
    tmp_path, proc = trained
    assert PAPER in proc.stdout and "16,598" in proc.stdout
    (run,) = runs(tmp_path, "evaluation", "FINISHED")
    assert run.data.tags["genome"] == PAPER and run.info.run_name == f"eval {Genome.parse(PAPER).short}"
    assert run.data.params["layer2.filters"] == "64" and run.data.params["trainer.epochs"] == "1"
    for m in (
        "param_count",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "train_loss",
        "val_loss",
        "perf/compile_seconds",  # housekeeping under its own prefix: the Chart view groups it apart
        "perf/train_seconds",
        "perf/images_per_second",
        "perf/wall_seconds",
    ):
        assert m in run.data.metrics, m
    assert "compile_seconds" not in run.data.metrics
    assert run.data.metrics["param_count"] == 16598
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


G = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"
BAD_INPUT = [
    (["+experiment=train", "genome=" + G.replace("NC 4 5", "NC 4 0", 1)], "kernel size 0 in layer 1 (NC) is not in [1..7]"),
    (["+experiment=train", "genome=" + G.replace("RC 64 3", "RC 64 8", 1)], "kernel size 8 in layer 2 (RC) is not in [1..7]"),
    (["+experiment=train", "genome=" + G.replace("NC 4 5", "NC 5 5", 1)], "filters 5 in layer 1 (NC) is not in [4, 8, 16, 32, 64]"),
    (["+experiment=train", "genome=" + G.replace("sigmoid", "elu", 1)], "activation 'elu' in layer 1 (NC) is not in"),
    (["+experiment=train", "genome=NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"], "has 3 layers; expected 5"),
    (["+experiment=train", "genome=NC 4 5 sigmoid;" + G], "has 6 layers; expected 5"),
    (["+experiment=train", "genome=" + G.replace("NC 4 5", "RC 4 5", 1)], "layer type 'RC' in layer 1 (NC) is not allowed"),
    (["+experiment=train", "genome=hello;world"], "has 2 layers; expected 5"),
    (["+experiment=train", "genome=''"], "mode=train needs genome="),
    (["+experiment=smoke", "search.population_size=0"], "search.population_size 0 must be >= 1"),
    (["+experiment=smoke", "search.population_size=-3"], "search.population_size -3 must be >= 1"),
    (["+experiment=smoke", "trainer.epochs=-2"], "trainer.epochs -2 must be >= 1"),
    (["+experiment=smoke", "fitness.size_weight=nan"], "fitness.size_weight must be a finite number"),
    (["+experiment=smoke", "fitness.size_weight=abc"], "converted to Float\n    full_key: fitness.size_weight"),  # Hydra, composing
    (["+experiment=smoke", "trainer.epoch=2"], "Key 'epoch' not in 'TrainConfigSchema'"),
    (["+experiment=smoke", "search=anneal"], "Could not find 'search/anneal'"),
    (["+experiment=smoke", "data.dir=/nonexistent"], "data.dir '/nonexistent' does not exist"),
    (["+experiment=smoke", "tracking.uri=sqlite:////etc/hostname/mlflow.db"], "does not exist"),
    (["+experiment=smoke", "tracking.system_metrics_seconds=0.5"], "tracking.system_metrics_seconds=0.5: must be 0 (off) or at least 1"),
]


def test_bad_input_exits_nonzero_and_writes_no_run(tmp_path):
    """The CLI's entry point (Hydra's main) called once per case in this process; a fresh process shows one case below."""
    for args, fragment in BAD_INPUT:
        done = job(tmp_path, *args, check=False)
        assert done.returncode not in (0, None) and fragment in done.text, (args, done.returncode, done.text[-2000:])
    assert not (tmp_path / "mlflow.db").exists() or runs(tmp_path) == []


def test_one_bad_input_through_a_fresh_process(tmp_path):
    """The exit status and message as a shell sees them, for one case of the list above."""
    proc = cli(tmp_path, "+experiment=smoke", "search.population_size=0", check=False)
    assert proc.returncode == 2 and "search.population_size 0 must be >= 1" in proc.stderr


@needs_real_data
def test_corrupt_data_file_exits_nonzero_and_writes_no_run(tmp_path):
    import gzip
    import shutil

    from conftest import REAL_DATA

    data = tmp_path / "data"
    shutil.copytree(REAL_DATA, data)
    raw = gzip.decompress((data / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw)[:-40])  # truncated gzip stream
    proc = job(tmp_path, "+experiment=smoke", f"data.dir={data}", check=False)
    assert proc.returncode != 0 and "t10k-labels-idx1-ubyte.gz is truncated or corrupt" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or runs(tmp_path) == []


def test_help_lists_the_experiments_and_groups(tmp_path):
    proc = job(tmp_path, "--help")
    for text in (
        "+experiment=hillclimb",
        "experiment: hillclimb, long, paper, predict, small_data, smoke, train",
        "search: evolution, hillclimb, hillclimb_mingain, optuna, random, table",
        "search/fidelity: asha, halving, none",
        "127.0.0.1",
        "README.md",
        *(f"python -m fmnas_jax +experiment={name}" for name in ("hillclimb", "long", "paper", "predict", "small_data", "smoke", "train")),
    ):
        assert text in proc.stdout, text


def test_multi_fidelity_search_tags_rungs_and_a_rerun_trains_nothing(halving, tmp_path):
    folder, first = halving  # read only: the rerun below works on a copy
    evals = runs(folder, "evaluation", "FINISHED")
    by_rung = Counter(r.data.tags.get("fmnas.rung") for r in evals)
    assert by_rung["0"] >= 6 and 1 <= by_rung["1"] < by_rung["0"]  # the population halved: a third promoted
    assert None not in by_rung and len(runs(folder, "final", "FINISHED")) == 1  # the retrained winner has its own role
    assert len({r.data.tags["budget_key"] for r in evals if r.data.tags.get("fmnas.rung") == "0"}) == 1
    promoted = {r.data.tags["genome"] for r in evals if r.data.tags.get("fmnas.rung") == "1"}
    assert promoted <= {r.data.tags["genome"] for r in evals if r.data.tags.get("fmnas.rung") == "0"}  # every rung-1 genome passed rung 0
    assert first.card()["genome"] in promoted  # selected at the full budget only
    copy = copy_store(folder, tmp_path / "copy")
    job(copy, *HALVING)
    assert len(runs(copy, "evaluation")) == len(evals) and len(runs(copy, "final")) == 1  # every (genome, rung) reused


def test_table_strategy_trains_only_the_population_and_ignores_evaluations_outside_its_space(tmp_path):
    """search=table trains its population, climbs over the table without training, and retrains the winner. The table
    climber reads every stored evaluation of its budget: one stored by a search over another space (64 filters, outside
    search_space=small), with the best accuracy of all, must not win."""
    from hydra import compose, initialize_config_module

    from fmnas_jax.backends import EvalSpec
    from fmnas_jax.cli import to_app_config
    from fmnas_jax.evaluator import budget_key
    from fmnas_jax.store import Store

    table = ["+experiment=smoke", "search=table", "search.population_size=3", "fitness.size_weight=0"]
    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        app = to_app_config(compose("config", overrides=table))
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "fmnas_jax")
    big = "NC 64 7 relu;RC 64 7 relu;NC 64 7 relu;RC 64 7 relu;FL relu;"
    rid = store.start_evaluation(big, "outside-the-small-space", budget_key(EvalSpec(app.trainer, app.data, app.seed)), None, {})
    store.log(rid, metrics={"val_accuracy": 0.99, "test_accuracy": 0.99, "train_accuracy": 0.99, "param_count": 113_994})
    store.end_run(rid)
    job(tmp_path, *table, "backend=inprocess")
    (search,) = runs(tmp_path, "search", "FINISHED")
    assert search.data.tags["winner"] != big
    evals = runs(tmp_path, "evaluation", "FINISHED")
    assert any(r.info.run_id == rid for r in evals)  # it was there to be read
    population = [r for r in evals if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert len(population) == 3 and len(evals) == 4 and len(runs(tmp_path, "final", "FINISHED")) == 1  # population, then the winner
