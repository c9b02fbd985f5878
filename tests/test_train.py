import math
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnas_jax import Genome
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.model import GenomeCNN
from fmnas_jax.pieces import CACHE
from fmnas_jax.train import (
    TrainConfig,
    augment,
    compiled_programs,
    epochs_that_fit,
    evaluate_split,
    init_state,
    lr_schedule,
    replanned_lrs,
    to_device,
    train_and_evaluate,
)

SMALL = Genome.parse("NC 8 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")


@pytest.fixture(scope="module")
def dd():
    return to_device(synthetic_dataset(512, 200, 300, seed=0), eval_batch=128)


@pytest.fixture
def fresh_cache():
    """An empty compiled-piece cache: earlier tests in this pytest process may have compiled a test's pieces already."""
    CACHE.clear()
    return CACHE


def _state(genome, cfg):
    return init_state(genome, cfg, 0)


def test_train_steps_decrease_loss(dd):
    cfg = TrainConfig(batch_size=64, epochs=1, learning_rate=3e-3)
    programs = compiled_programs(SMALL, cfg, dd)
    state, perm, key = _state(SMALL, cfg), jnp.arange(dd.x_train.shape[0]), jax.random.key(0)
    losses = []
    for i in range(8):
        acc = jnp.zeros(2)
        state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, key, np.float32(3e-3), 0, i % 8)
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


def test_programs_are_compiled_once_per_shape(dd, fresh_cache):
    cfg = TrainConfig(batch_size=64, epochs=1)
    g = Genome.parse("NC 4 1 tanh;RC 4 1 tanh;NC 4 1 tanh;RC 4 1 tanh;FL tanh;")
    first = train_and_evaluate(g, dd, cfg, seed=0)
    second = train_and_evaluate(g, dd, TrainConfig(batch_size=64, epochs=2, learning_rate=1e-3), seed=1)
    assert first.compile_seconds > 0
    assert second.compile_seconds == 0.0  # another budget, same shapes: no recompilation


def test_budgets_and_recipe_values_share_every_compiled_piece(dd):
    """A genome's pieces are compiled once for all its budgets: epochs, learning rate, schedule and
    weight decay are run-time values (optax's injected hyperparameters); flips change only the batch piece."""
    g = Genome.parse("NC 4 2 relu;RC 4 2 relu;NC 4 2 relu;RC 4 2 relu;FL relu;")
    assert train_and_evaluate(g, dd, TrainConfig(batch_size=64, epochs=1), seed=0).status == "FINISHED"
    before = CACHE.compiles
    budgets = [
        TrainConfig(batch_size=64, epochs=2, learning_rate=1e-3, schedule="constant"),
        TrainConfig(batch_size=64, epochs=1, learning_rate=5e-3, optimizer="adam"),
    ]
    for cfg in budgets:
        assert train_and_evaluate(g, dd, cfg, seed=1).status == "FINISHED"
    assert CACHE.compiles == before
    train_and_evaluate(g, dd, TrainConfig(batch_size=64, epochs=1, augment_flip=True), seed=0)
    assert CACHE.compiles == before + 1  # the batch piece with flips; every layer piece is shared


def test_a_neighbour_compiles_only_the_pieces_its_changed_gene_needs(dd, fresh_cache):
    cfg = TrainConfig(batch_size=64, epochs=1)
    g = Genome.parse("NC 4 3 relu;RC 8 3 relu;NC 4 3 relu;RC 8 3 relu;FL relu;")
    train_and_evaluate(g, dd, cfg, seed=0)
    before = CACHE.compiles
    train_and_evaluate(Genome.parse("NC 4 3 relu;RC 8 3 relu;NC 4 3 tanh;RC 8 3 relu;FL relu;"), dd, cfg, seed=0)
    assert CACHE.compiles == before + 3  # tanh + BatchNorm at that size: forward, gradient, eval
    before = CACHE.compiles
    train_and_evaluate(Genome.parse("NC 4 3 relu;RC 8 3 relu;NC 4 3 relu;RC 8 3 relu;FL gelu;"), dd, cfg, seed=0)
    assert CACHE.compiles == before + 2  # the head (train, eval)


def test_augmentation_is_deterministic_for_a_seed_and_changes_images():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1)), jnp.uint8)
    a = augment(x, jax.random.key(1), crop=2, flip=True)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert np.array_equal(np.asarray(a), np.asarray(augment(x, jax.random.key(1), crop=2, flip=True)))
    assert not np.array_equal(np.asarray(a), np.asarray(augment(x, jax.random.key(2), crop=2, flip=True)))
    flipped = np.asarray(augment(x, jax.random.key(3), crop=0, flip=True))
    for img, orig in zip(flipped, np.asarray(x), strict=True):  # each image is itself or its mirror
        assert np.array_equal(img, orig) or np.array_equal(img, orig[:, ::-1])
    shifted = np.asarray(augment(x, jax.random.key(4), crop=2, flip=False))
    for img, orig in zip(shifted, np.asarray(x), strict=True):  # a window of the zero-padded image
        padded = np.pad(orig, ((2, 2), (2, 2), (0, 0)))
        assert any(np.array_equal(img, padded[dy : dy + 28, dx : dx + 28]) for dy in range(5) for dx in range(5))


def test_recipe_settings_train_and_enter_the_result(dd):
    base = TrainConfig(batch_size=64, epochs=2)
    plain = train_and_evaluate(SMALL, dd, base, seed=0)
    recipe = replace(base, augment_crop=2, augment_flip=True, label_smoothing=0.1, optimizer="adamw", weight_decay=0.05)
    r1, r2 = train_and_evaluate(SMALL, dd, recipe, seed=0), train_and_evaluate(SMALL, dd, recipe, seed=0)
    assert r1.status == "FINISHED" and r1.val_accuracy > 0.3  # still learns (chance 0.1)
    assert r1.history == r2.history  # deterministic for a seed
    assert r1.history != plain.history
    assert r1.images_trained == 2 * (512 // 64) * 64 and r1.wall_seconds >= r1.train_seconds


def test_budgets_of_any_training_size_share_one_program():
    """The training array is padded to one capacity: a multi-fidelity search's rungs (different
    data.train_size) and the final retrain reuse one compiled step per genome."""
    g = Genome.parse("NC 4 3 relu;RC 4 3 relu;NC 4 3 relu;RC 4 3 relu;FL relu;")
    cfg = TrainConfig(batch_size=64, epochs=1)
    first = train_and_evaluate(g, to_device(synthetic_dataset(256, 100, 100, seed=0), 100), cfg, 0)
    before = CACHE.compiles
    second = train_and_evaluate(g, to_device(synthetic_dataset(512, 100, 100, seed=0), 100), cfg, 0)
    assert CACHE.compiles == before and second.compile_seconds == 0.0
    assert [first.images_trained, second.images_trained] == [256, 512]


def test_divergence_is_a_failed_result_not_an_exception(dd):
    r = train_and_evaluate(SMALL, dd, TrainConfig(batch_size=64, epochs=2, learning_rate=1e4, schedule="constant"), seed=0)
    assert r.status == "FAILED"
    assert "diverged" in r.reason
    assert "metrics" not in r.summary() and "test_accuracy" not in r.summary()


def test_eval_masks_padding(dd):
    cfg = TrainConfig(batch_size=64, epochs=1)
    state = _state(SMALL, cfg)
    programs = compiled_programs(SMALL, cfg, dd)
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
        ({"label_smoothing": 1.0}, "trainer.label_smoothing 1.0"),
        ({"augment_crop": 9}, r"trainer.augment_crop 9 must be in \[0..8\]"),
    ],
)
def test_train_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**kwargs)


def test_epochs_that_fit_a_deadline():
    # 10 s epochs, 100 s left: 10 more fit; fewer are planned only when the rest would run past the deadline
    assert epochs_that_fit(2, 8, [10.0, 10.0], 100.0) == 8
    assert epochs_that_fit(2, 30, [10.0, 10.0], 100.0) == 12
    assert epochs_that_fit(2, 30, [10.0, 10.0], 100.0, reserve=15.0) == 10  # the test pass kept back
    # the first epoch (the data's first touch) is not a steady one: alone it cuts nothing, later it is left out
    assert epochs_that_fit(1, 30, [40.0], 100.0) == 30
    assert epochs_that_fit(3, 30, [40.0, 10.0, 10.0], 100.0) == 13
    # the median of the last three steady ones: one slow epoch does not cut the plan, a slower machine does
    assert epochs_that_fit(5, 30, [10.0, 10.0, 10.0, 50.0, 10.0], 100.0) == 15
    assert epochs_that_fit(5, 30, [10.0, 20.0, 20.0, 20.0, 20.0], 100.0) == 10
    # past the deadline: what is done, and at least one epoch
    assert epochs_that_fit(4, 30, [10.0] * 4, -5.0) == 4
    assert epochs_that_fit(1, 30, [10.0], 0.0) == 1


def test_replanned_schedule_decays_to_its_new_end():
    cfg = TrainConfig(epochs=10, learning_rate=1e-2)
    steps = 7
    lrs = lr_schedule(cfg, 10 * steps)
    cut = replanned_lrs(cfg, lrs, steps, done=3, total=6)
    assert len(cut) == 6 * steps
    np.testing.assert_array_equal(cut[: 3 * steps], lrs[: 3 * steps])  # the steps taken keep their rates
    np.testing.assert_allclose(cut[3 * steps :], lr_schedule(cfg, 6 * steps)[3 * steps :])  # the rest: a 6-epoch cosine
    assert cut[-1] < 0.01 * cfg.learning_rate < lrs[6 * steps - 1]  # it ends near 0, where the 10-epoch one was still high
    assert replanned_lrs(cfg, lrs, steps, done=3, total=10) is lrs


def test_a_deadline_cuts_the_epochs_and_only_then(dd):
    cfg = TrainConfig(batch_size=64, epochs=3)
    past = train_and_evaluate(SMALL, dd, cfg, seed=0, deadline=time.monotonic())
    assert past.status == "FINISHED", past.reason
    assert len(past.history["val_accuracy"]) == 1 and past.images_trained == 512 // 64 * 64  # one epoch: never none
    assert math.isfinite(past.test_accuracy)
    plain = train_and_evaluate(SMALL, dd, cfg, seed=0)
    far = train_and_evaluate(SMALL, dd, cfg, seed=0, deadline=time.monotonic() + 3600)
    assert len(far.history["val_accuracy"]) == 3
    assert far.history == plain.history  # a deadline that is not reached changes nothing
