"""Keys decide reuse, and the evaluator alone decides train-or-reuse (synthetic data, a temporary SQLite store)."""

import time
from dataclasses import replace

import pytest
from conftest import PAPER

from fmnas_jax import Genome
from fmnas_jax.backends import EvalSpec, InProcess
from fmnas_jax.config import AppConfig, InProcessBackend
from fmnas_jax.data import FashionMnistData, synthetic_load
from fmnas_jax.evaluator import Evaluator, budget_key, eval_key
from fmnas_jax.jobs.search import search_key
from fmnas_jax.search import FitnessConfig, HillClimbConfig
from fmnas_jax.store import Store
from fmnas_jax.train import TrainConfig

SPEC = EvalSpec(TrainConfig(epochs=1, batch_size=64), FashionMnistData(train_size=256, val_size=100), 0)
G1 = Genome.parse("NC 4 1 relu;RC 4 2 relu;NC 4 1 relu;RC 4 2 relu;FL relu;")
G2 = Genome.parse("NC 4 1 tanh;RC 4 2 relu;NC 4 1 relu;RC 4 2 relu;FL relu;")


def _key(trainer=TrainConfig(), data=FashionMnistData(), seed=0):  # noqa: B008
    return budget_key(EvalSpec(trainer, data, seed))


def test_budget_key_follows_result_settings_only():
    base = _key()
    assert _key() == base
    assert _key(TrainConfig(save=True, eval_batch_size=500), FashionMnistData(verify=False)) == base  # no effect on results
    assert budget_key(EvalSpec(TrainConfig(), FashionMnistData(), 0, keep_variables=True)) == base
    changed = [_key(TrainConfig(epochs=3)), _key(TrainConfig(learning_rate=1e-3)), _key(data=FashionMnistData(train_size=1000)),
               _key(seed=1), _key(TrainConfig(augment_flip=True)), _key(TrainConfig(label_smoothing=0.1))]  # fmt: skip
    assert base not in changed and len(set(changed)) == len(changed)


def test_eval_key_is_genome_plus_budget():
    b = _key()
    assert eval_key(PAPER, b) == eval_key(PAPER, b)
    assert eval_key(PAPER, b) != eval_key(PAPER.replace("FL gelu", "FL relu"), b)
    assert eval_key(PAPER, b) != eval_key(PAPER, _key(TrainConfig(epochs=1)))


def test_search_key_changes_with_what_shapes_the_path():
    app = AppConfig()
    assert search_key(app) == search_key(AppConfig())
    assert search_key(replace(app, search=HillClimbConfig(seed=1))) != search_key(app)
    assert search_key(replace(app, fitness=FitnessConfig(size_weight=0.05))) != search_key(app)
    assert search_key(replace(app, trainer=TrainConfig(epochs=2))) != search_key(app)
    assert search_key(replace(app, search=HillClimbConfig(time_budget="10m"))) != search_key(app)
    in_process = replace(app, progress=False, backend=InProcessBackend())
    assert search_key(in_process) == search_key(app)  # how it runs, not what it finds


@pytest.fixture
def store(tracking_uri):
    return Store(tracking_uri, "unit")


def _statuses(store):
    return sorted(r.info.status for r in store.client.search_runs([store.experiment_id]))


def test_miss_trains_then_hit_reuses(store):
    first = Evaluator(store, SPEC, InProcess(synthetic_load))
    out = first.evaluate_many([G1, G2, G1])
    assert list(out) == [G1, G2] and first.trained == 2 and first.reused == 0
    assert all(o.status == "FINISHED" and not o.reused for o in out.values())
    again = Evaluator(store, SPEC, InProcess(synthetic_load))
    hit = again.evaluate(G1)
    assert hit.reused and hit.run_id == out[G1].run_id and hit.metrics["val_accuracy"] == out[G1].metrics["val_accuracy"]
    assert again.trained == 0 and again.reused == 1
    assert _statuses(store) == ["FINISHED", "FINISHED"]  # nothing trained twice


def test_a_batch_opens_each_run_when_it_is_submitted_and_leaves_a_genome_another_process_took(store):
    """A batch larger than the backend runs at once: a genome waiting its turn has no run yet (no RUNNING run in the UI,
    nothing KILLED if the job stops), and one that another process finished meanwhile is reused, not trained again."""
    G3 = Genome.parse("NC 4 1 swish;RC 4 2 relu;NC 4 1 relu;RC 4 2 relu;FL relu;")
    other = Evaluator(store, SPEC, InProcess(synthetic_load))
    running = []

    def seen(outcome):  # as each result arrives, the runs open now; the other process finishes G3 meanwhile
        running.append(len(store._search("attributes.status = 'RUNNING'")))
        if outcome.genome == G1:
            other.evaluate(G3)

    ev = Evaluator(store, SPEC, InProcess(synthetic_load))
    got = ev.evaluate_many([G1, G2, G3], on_done=seen)
    assert running == [0, 0, 0] and set(got) == {G1, G2, G3}  # one at a time (parallelism 1): none open between them
    assert got[G3].reused and ev.counts() == {"trained": 2, "reused": 1, "failed": 0}
    assert len(store._search("attributes.status = 'FINISHED'")) == 3  # G3 trained once, by the other process


def test_a_deadline_cut_is_recorded_and_reused_as_it_is(store):
    """A retrain past its deadline (InProcess(deadline=...)) trains fewer epochs than its budget: the run says how
    many (epochs_trained beside budget_epochs, the plan per epoch), and a rerun of the same budget reuses it."""
    three = replace(SPEC, trainer=replace(SPEC.trainer, epochs=3))
    cut = Evaluator(store, three, InProcess(synthetic_load, fused=True, deadline=time.monotonic()), role="final").evaluate(G1)
    assert cut.status == "FINISHED" and cut.metrics["epochs_trained"] == 1
    record = store.get_run(cut.run_id)
    assert record.metric("epochs_trained") == 1 and record.metric("budget_epochs") == 3 and record.metric("epochs_planned") == 1
    assert "3 epochs" in record.tags["mlflow.note.content"] and "planned; **trained 1 epoch**" in record.tags["mlflow.note.content"]
    again = Evaluator(store, three, InProcess(synthetic_load, fused=True), role="final").evaluate(G1)
    assert again.reused and again.run_id == cut.run_id and again.metric("epochs_trained") == 1
    far = InProcess(synthetic_load, fused=True, deadline=time.monotonic() + 3600)
    whole = Evaluator(store, replace(three, seed=1), far, role="final").evaluate(G1)  # a deadline not reached: all 3
    assert not whole.reused and whole.metrics["epochs_trained"] == 3 and store.get_run(whole.run_id).metric("epochs_planned") == 3
    assert "trained" not in store.get_run(whole.run_id).tags["mlflow.note.content"].split("Budget:")[1].split(";")[0]


def test_another_budget_is_a_miss(store):
    Evaluator(store, SPEC, InProcess(synthetic_load)).evaluate(G1)
    other = Evaluator(store, replace(SPEC, seed=1), InProcess(synthetic_load))
    assert other.lookup(G1) is None
    assert not other.evaluate(G1).reused and other.trained == 1


def test_a_concurrent_finisher_is_found_and_the_repeat_tagged(store):
    """Two evaluators that both missed (two processes): the later finisher is tagged as a duplicate."""
    a, b = Evaluator(store, SPEC, InProcess(synthetic_load)), Evaluator(store, SPEC, InProcess(synthetic_load))
    assert a.lookup(G1) is None and b.lookup(G1) is None
    first = a.evaluate(G1)
    second_run = b._start(G1)  # b had decided to train before a finished
    result = InProcess(synthetic_load).evaluate([G1], SPEC)
    second = b._finish(G1, second_run, next(result)[1])
    tags = store.get_run(second.run_id).tags
    assert tags["fmnas.duplicate_of"] == first.run_id
    assert b.lookup(G1).run_id == first.run_id  # the earliest stays authoritative


def test_a_failed_evaluation_is_stored_failed_and_not_reused(store):
    bad = replace(SPEC, trainer=TrainConfig(epochs=2, batch_size=64, learning_rate=1e4, schedule="constant"))
    ev = Evaluator(store, bad, InProcess(synthetic_load))
    o = ev.evaluate(G1)
    assert o.status == "FAILED" and ev.failed == 1
    assert "diverged" in store.get_run(o.run_id).tags["fmnas.reason"]
    assert Evaluator(store, bad, InProcess(synthetic_load)).lookup(G1) is None  # a rerun tries again


def test_admit_decides_what_is_evaluated(store):
    ev = Evaluator(store, SPEC, InProcess(synthetic_load))
    ev.evaluate(G1)
    seen = []
    out = ev.evaluate_many([G1, G2], admit=lambda g, stored: seen.append((g, stored is not None)) or g == G1)
    assert seen == [(G1, True), (G2, False)]
    assert list(out) == [G1] and out[G1].reused and ev.trained == 1  # G2 refused: not trained


@pytest.mark.parametrize("name", ["team/winner", "a:b", "it's", ".", "..up", " "])
def test_register_as_rejects_names_mlflow_cannot_register_before_training(store, name):
    with pytest.raises(ValueError, match="register_as"):
        Evaluator(store, SPEC, InProcess(synthetic_load), role="final", register_as=name)
    assert _statuses(store) == []  # nothing started, nothing half-written
