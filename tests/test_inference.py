"""Saved weights: round trip, the predict command, the per-class report, and the bad cases."""

import json

import jax
import numpy as np
import pytest
from conftest import PAPER, needs_real_data
from helpers import job, runs
from mlflow import MlflowClient

from fmnas_jax import Genome
from fmnas_jax.checkpoint import CheckpointError, checkpoint_bytes, read_checkpoint
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.inference import as_images, confusion_matrix, load_checkpoint, load_run, per_class_markdown, read_images
from fmnas_jax.model import GenomeCNN
from fmnas_jax.store import Store, StoreError
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

SMALL = Genome.parse("NC 8 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")


@pytest.fixture(scope="module")
def small():
    data = synthetic_dataset(256, 100, 200, seed=1)
    r = train_and_evaluate(SMALL, to_device(data, 100), TrainConfig(batch_size=64, epochs=2), seed=0, keep_variables=True)
    return r, data


def test_save_load_gives_identical_logits(small, tmp_path):
    r, data = small
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(checkpoint_bytes(SMALL, r.variables, r.normalisation))
    model = load_checkpoint(path)
    assert model.genome == SMALL and model.normalisation == r.normalisation
    mean, std = (np.asarray(v, np.float32) for v in r.normalisation)  # per channel
    x = (data.x_test[:32].astype(np.float32) / 255 - mean) / std
    a = GenomeCNN(SMALL).apply(r.variables, x, train=False)
    b = GenomeCNN(SMALL).apply(model.variables, x, train=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    pred = model.predict_fn()(data.x_test)
    assert pred.shape == (200,) and np.mean(pred == data.y_test) == pytest.approx(r.test_accuracy)
    assert np.array_equal(model.predict_fn()(data.x_test[:, :, :, 0]), pred)  # (N, 28, 28) works too


def test_a_checkpoint_with_one_mean_and_std_still_reads(small):
    """Checkpoints written before normalisation was per channel stored one float each: read as one channel."""
    from flax import serialization

    r, _ = small
    blob = serialization.msgpack_restore(checkpoint_bytes(SMALL, jax.tree_util.tree_map(np.asarray, r.variables), r.normalisation))
    blob["normalisation"] = {"mean": 0.2861, "std": 0.353}
    assert read_checkpoint(serialization.msgpack_serialize(blob)).normalisation == ((0.2861,), (0.353,))


def test_checkpoint_that_does_not_fit_its_genome(small, tmp_path):
    r, _ = small
    other = Genome.parse("NC 8 3 relu;RC 32 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")  # layer 2 wider
    blob = checkpoint_bytes(other, jax.tree_util.tree_map(np.asarray, r.variables), r.normalisation)
    with pytest.raises(CheckpointError, match="do not match genome"):
        read_checkpoint(blob)
    with pytest.raises(CheckpointError, match="not a fmnas_jax checkpoint"):
        read_checkpoint(b"\x00garbage")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.msgpack")


def test_confusion_matrix_and_table():
    cm = confusion_matrix(np.array([0, 0, 1, 9, 9]), np.array([0, 1, 1, 9, 0]))
    assert cm.sum() == 5 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[9, 0] == 1
    table = per_class_markdown(cm)
    assert "| 0 | T-shirt/top | 2 | 1 | 50.00% |" in table and "Ankle boot" in table


def test_read_images_npy_and_shapes(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 28, 28), np.uint8))
    assert read_images(tmp_path / "x.npy").shape == (3, 28, 28, 1)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        as_images(np.zeros((3, 32, 32)))


def test_missing_run_and_run_without_weights(tracking_uri):
    store = Store(tracking_uri, "fmnas_jax")
    with pytest.raises(StoreError, match="not found"):
        load_run("0123456789abcdef", store=store)
    rid = store.start_run("G", "evaluation", {"genome": PAPER})
    store.end_run(rid)
    with pytest.raises(StoreError, match="no saved weights"):
        load_run(rid, store=store)


@pytest.mark.slow
@needs_real_data
def test_train_save_predict_matches_logged_accuracy(trained, tmp_path):
    folder, proc = trained
    run_dir = proc.files
    card = json.loads((run_dir / "result_card.json").read_text())
    cm = np.loadtxt(run_dir / "confusion_matrix.csv", delimiter=",", dtype=int)
    assert cm.shape == (10, 10) and cm.sum() == 10000  # the whole test set
    assert np.trace(cm) / cm.sum() == pytest.approx(card["test_accuracy"], abs=1e-6)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(card["run_id"], "report")}
    assert {"report/confusion_matrix.png", "report/per_class.md"} <= arts
    assert client.get_run(card["run_id"]).data.tags["fmnas.checkpoint"].endswith("/artifacts/checkpoint.msgpack")  # in its logged model

    np.save(tmp_path / "few.npy", read_images("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")[:5])  # IDX reader too
    store = f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"  # the shared run's store, read from this test's folder
    pred = job(tmp_path, store, "+experiment=predict", f"run_id={card['run_id']}", f"images={tmp_path / 'few.npy'}")
    assert "matches the logged value" in pred.stdout and "5 images classified" in pred.stdout
    assert f"{100 * card['test_accuracy']:.2f}%" in pred.stdout
    assert len(runs(folder, "evaluation")) == 1  # predicting logs nothing

    bad = job(tmp_path, store, "+experiment=predict", "run_id=0123456789abcdef", check=False)
    assert bad.returncode != 0 and "not found" in bad.stderr
    wrong = job(
        tmp_path,
        store,
        "+experiment=predict",
        f"run_id={card['run_id']}",
        "genome=NC 4 5 relu;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;",
        check=False,
    )
    assert wrong.returncode != 0 and "does not match" in wrong.stderr
