import math

import jax.numpy as jnp
import numpy as np
import pytest

from fmnas_jax import Genome
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.model import GenomeCNN
from fmnas_jax.train import (
    TrainConfig,
    compiled_programs,
    evaluate_split,
    init_state,
    lr_schedule,
    to_device,
    train_and_evaluate,
)

SMALL = Genome.parse("NC 8 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")


@pytest.fixture(scope="module")
def dd():
    return to_device(synthetic_dataset(512, 200, 300, seed=0), eval_batch=128)


def _state(genome, cfg):
    return init_state(genome, cfg, 0)


def test_train_steps_decrease_loss(dd):
    cfg = TrainConfig(batch_size=64, epochs=1, learning_rate=3e-3)
    programs = compiled_programs(SMALL, cfg, _state(SMALL, cfg), dd)
    state, perm = _state(SMALL, cfg), jnp.arange(512)
    losses = []
    for i in range(8):
        acc = jnp.zeros(2)
        state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, np.float32(3e-3), i % 8)
        losses.append(float(acc[0]) / 64)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_learns_the_synthetic_task(dd):
    r = train_and_evaluate(SMALL, dd, TrainConfig(batch_size=64, epochs=4), seed=0)
    assert r.status == "FINISHED", r.reason
    assert r.val_accuracy > 0.5 and r.test_accuracy > 0.5  # chance is 0.1
    assert len(r.history["val_accuracy"]) == 4
    assert r.history["train_loss"][-1] < r.history["train_loss"][0]
    assert r.param_count == 5506
    assert r.images_per_second > 0 and r.train_seconds > 0


def test_same_seed_same_metrics(dd):
    cfg = TrainConfig(batch_size=64, epochs=1)
    a = train_and_evaluate(SMALL, dd, cfg, seed=3)
    b = train_and_evaluate(SMALL, dd, cfg, seed=3)
    c = train_and_evaluate(SMALL, dd, cfg, seed=4)
    assert a.history == b.history and a.test_accuracy == b.test_accuracy
    assert a.history != c.history


def test_programs_are_compiled_once_per_shape(dd):
    cfg = TrainConfig(batch_size=64, epochs=1)
    g = Genome.parse("NC 4 1 tanh;RC 4 1 tanh;NC 4 1 tanh;RC 4 1 tanh;FL tanh;")
    first = train_and_evaluate(g, dd, cfg, seed=0)
    second = train_and_evaluate(g, dd, TrainConfig(batch_size=64, epochs=2, learning_rate=1e-3), seed=1)
    assert first.compile_seconds > 0
    assert second.compile_seconds == 0.0  # another budget, same shapes: no recompilation


def test_divergence_is_a_failed_result_not_an_exception(dd):
    r = train_and_evaluate(SMALL, dd, TrainConfig(batch_size=64, epochs=2, learning_rate=1e4, schedule="constant"), seed=0)
    assert r.status == "FAILED"
    assert "diverged" in r.reason
    assert "metrics" not in r.metrics() and "test_accuracy" not in r.metrics()


def test_eval_masks_padding(dd):
    cfg = TrainConfig(batch_size=64, epochs=1)
    state = _state(SMALL, cfg)
    programs = compiled_programs(SMALL, cfg, state, dd)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, acc = evaluate_split(programs, variables, dd, dd.test_range)
    x = (dd.x_eval[200:500].astype(jnp.float32) / 255 - dd.norm[0]) / dd.norm[1]
    logits = GenomeCNN(SMALL).apply(variables, x, train=False)
    expected = float((logits.argmax(-1) == dd.y_eval[200:500]).mean())
    assert acc == pytest.approx(expected, abs=1e-6)


def test_schedules():
    cos = lr_schedule(TrainConfig(learning_rate=0.1), 100)
    assert cos[0] == pytest.approx(0.1) and cos[-1] < 0.001 and np.all(np.diff(cos) <= 0)
    assert np.all(lr_schedule(TrainConfig(learning_rate=0.1, schedule="constant"), 10) == np.float32(0.1))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": -1}, "trainer.epochs -1"),
        ({"learning_rate": float("nan")}, "trainer.learning_rate nan"),
        ({"optimizer": "lion"}, "'lion' is not one of"),
        ({"batch_size": 0}, "trainer.batch_size 0"),
    ],
)
def test_train_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**kwargs)
