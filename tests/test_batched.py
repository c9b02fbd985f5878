"""The vmapped same-shape path computes what training each genome alone computes."""

import numpy as np
import pytest

from fmnas_jax import Genome
from fmnas_jax.batched import signature, train_batched
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

BASE = "NC 8 3 {a};RC 16 3 {b};NC 8 3 {c};RC 16 3 relu;FL {d};"
GENOMES = [Genome.parse(BASE.format(a=a, b=b, c=c, d=d)) for a, b, c, d in
           [("relu", "relu", "relu", "relu"), ("sigmoid", "gelu", "tanh", "swish"), ("swish", "tanh", "gelu", "sigmoid")]]  # fmt: skip


@pytest.fixture(scope="module")
def dd():
    return to_device(synthetic_dataset(384, 128, 200, seed=2), eval_batch=128)


def test_batched_equals_solo(dd):
    cfg = TrainConfig(batch_size=64, epochs=2)
    batched = train_batched(GENOMES, dd, cfg, seed=0)
    for g, b in zip(GENOMES, batched, strict=True):
        solo = train_and_evaluate(g, dd, cfg, seed=0)
        assert b.genome == str(g) and b.status == solo.status == "FINISHED"
        for k in ("train_loss", "val_loss"):
            np.testing.assert_allclose(b.history[k], solo.history[k], rtol=2e-4)
        assert b.test_accuracy == pytest.approx(solo.test_accuracy, abs=1 / 200 + 1e-9)  # at most one near-tie flips
        assert b.param_count == solo.param_count


def test_divergence_is_per_model(dd):
    cfg = TrainConfig(batch_size=64, epochs=1, learning_rate=1e4, schedule="constant")
    results = train_batched(GENOMES[:2], dd, cfg, seed=0)
    assert all(r.status == "FAILED" and "diverged" in r.reason for r in results)


def test_one_signature_only():
    assert signature(GENOMES[0]) == signature(GENOMES[1])
    other = Genome.parse("NC 4 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")
    with pytest.raises(ValueError, match="one shape signature"):
        train_batched([GENOMES[0], other], None, TrainConfig(), 0)
