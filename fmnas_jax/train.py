"""Jit-compiled training and evaluation of one genome on a device-resident dataset.

Imports jax/flax/optax/numpy only, so it runs on a bare accelerator image.

Loop structure: a jitted step called from a Python loop. On XLA:CPU the same step inside
`lax.scan` ran ~15x slower (weight-gradient convolutions in a while-loop body get a slow
layout); see docs/benchmarks.md. Steps dispatch asynchronously, and the host syncs once per
epoch to read the loss, so the Python loop costs little on an accelerator as well.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnas_jax.data import Dataset
from fmnas_jax.genome import IMAGE_SIZE, Genome, count_params
from fmnas_jax.model import GenomeCNN, init_variables, variable_shapes
from fmnas_jax.runtime import cache_hits

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# Mean training cross-entropy above which a run counts as diverged (chance level is ln 10 = 2.3):
# Adam bounds each update, so a far too large learning rate can leave the loss huge but finite.
DIVERGED_LOSS = 1e4
AUGMENT_STREAM = 0xA06  # fold_in constant: the augmentation's random stream, apart from init and shuffling
PROGRAM_CACHE = 64  # compiled train steps and eval chunks kept per process, least recently used dropped
TRAIN_CAPACITY = 55_000  # training rows on the device (padded): every training subset fits, so all share one step


@dataclass(frozen=True)
class TrainConfig:
    """Training budget, optimiser and recipe; everything except `save` and `eval_batch_size` changes results."""

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    label_smoothing: float = 0.0
    augment_crop: int = 0  # random crop from the image padded by this many pixels (0 = off)
    augment_flip: bool = False  # random horizontal flip
    eval_batch_size: int = 1000
    save: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"trainer.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"trainer.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"trainer.learning_rate {self.learning_rate} must be a positive finite number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"trainer.weight_decay {self.weight_decay} must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"trainer.batch_size {self.batch_size} and eval_batch_size {self.eval_batch_size} must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"trainer.epochs {self.epochs} must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"trainer.label_smoothing {self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.augment_crop <= 8:
            raise ValueError(f"trainer.augment_crop {self.augment_crop} must be in [0..8] pixels (0 = off)")

    def result_settings(self) -> dict:
        """Settings that change an evaluation's result (for the eval key)."""
        d = asdict(self)
        del d["save"], d["eval_batch_size"]
        return d

    def step_settings(self) -> StepSettings:
        """What the compiled train step depends on (epochs, learning rate and schedule are fed at run time)."""
        return StepSettings(self.optimizer, self.batch_size, self.label_smoothing, self.augment_crop, self.augment_flip)


class StepSettings(NamedTuple):
    optimizer: str
    batch_size: int
    label_smoothing: float
    augment_crop: int
    augment_flip: bool


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclass
class EvalResult:
    """What one evaluation produced. `status` is FINISHED or FAILED (then `reason` says why)."""

    genome: str
    status: str
    param_count: int
    reason: str | None = None
    train_accuracy: float = float("nan")
    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    train_loss: float = float("nan")
    val_loss: float = float("nan")
    compile_seconds: float = 0.0
    cache_hits: int = 0  # programs loaded from JAX's persistent cache instead of compiled
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    images_trained: int = 0  # epochs x images per epoch (what the cost model predicts from)
    wall_seconds: float = 0.0  # the whole evaluation: compile, training, validation and test
    history: dict[str, list[float]] = field(default_factory=dict)
    variables: Any = None  # numpy tree {'params', 'batch_stats'} when kept
    normalisation: tuple[float, float] = (0.0, 1.0)

    def summary(self) -> dict[str, float]:
        """The final scalar values (finite ones only)."""
        keys = ("param_count", "train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss")
        keys += ("compile_seconds", "cache_hits", "train_seconds", "images_per_second", "images_trained", "wall_seconds")
        return {k: float(getattr(self, k)) for k in keys if math.isfinite(float(getattr(self, k)))}


def failed(genome: Genome, reason: str) -> EvalResult:
    """A FAILED result for a genome that could not be evaluated."""
    return EvalResult(str(genome), "FAILED", count_params(genome), reason=reason)


class DeviceData(NamedTuple):
    """A Dataset placed on the device once. Validation and test share one padded eval array
    (val rows first), so a single compiled eval program serves both."""

    x_train: jax.Array  # (capacity, 28, 28, 1) uint8: the N training images, then zero padding
    y_train: jax.Array  # (capacity,) int32
    x_eval: jax.Array  # (V + T + padding, 28, 28, 1) uint8
    y_eval: jax.Array
    n_val: int
    n_test: int
    norm: jax.Array  # (2,) mean, std of the training split
    eval_batch: int
    n_train: int  # real training images (batches are drawn from the first n_train rows only)

    @property
    def val_range(self) -> tuple[int, int]:
        return 0, self.n_val

    @property
    def test_range(self) -> tuple[int, int]:
        return self.n_val, self.n_val + self.n_test

    @property
    def device(self) -> Any:
        return next(iter(self.x_train.devices()))


def to_device(data: Dataset, eval_batch: int = 1000) -> DeviceData:
    """Put every split on the default device (uint8 images: 47 MB for all of Fashion-MNIST).

    The training split is zero-padded to a capacity that fits every subset of Fashion-MNIST, so the
    cheap rungs of a multi-fidelity search, the full budget and the final retrain of one genome share
    one compiled train step (its shapes no longer depend on data.train_size)."""
    n = len(data.y_train)
    capacity = max(TRAIN_CAPACITY, n)
    x_train = np.concatenate([data.x_train, np.zeros((capacity - n, *data.x_train.shape[1:]), np.uint8)])
    y_train = np.concatenate([data.y_train, np.zeros(capacity - n, np.int32)])
    x_eval = np.concatenate([data.x_val, data.x_test])
    y_eval = np.concatenate([data.y_val, data.y_test])
    extra = -len(y_eval) % eval_batch + eval_batch  # room for a chunk that starts anywhere
    x_eval = np.concatenate([x_eval, np.zeros((extra, *x_eval.shape[1:]), np.uint8)])
    y_eval = np.concatenate([y_eval, np.zeros(extra, np.int32)])
    norm = np.asarray([data.mean, data.std], np.float32)
    put = jax.device_put
    return DeviceData(put(x_train), put(y_train), put(x_eval), put(y_eval), len(data.y_val), len(data.y_test), put(norm), eval_batch,
                      n)  # fmt: skip


# ---------------------------------------------------------------------------
# The pieces of a step (shared with the batched path, so a bucket computes what solo training does)
# ---------------------------------------------------------------------------


def make_optimizer(optimizer: str, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """optax's optimiser with its learning rate injected as state, set per step (see `train_update`)."""
    if optimizer == "sgd":
        base = functools.partial(optax.sgd, momentum=0.9, nesterov=True)
    elif optimizer == "adamw":
        base = functools.partial(optax.adamw, weight_decay=weight_decay)
    else:
        base = optax.adam
    return optax.inject_hyperparams(base)(learning_rate=0.0)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """Per-step learning rates, (total_steps,) float32. Fed to the step as a scalar, so that
    budgets of different lengths share one compiled program."""
    if cfg.schedule == "constant":
        schedule = optax.constant_schedule(cfg.learning_rate)
    else:
        schedule = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps, 1))
    return np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)), np.float32)


def normalise(x: jax.Array, norm: jax.Array) -> jax.Array:
    """uint8 images -> float32, standardised with the training split's mean and std."""
    return (x.astype(jnp.float32) / 255.0 - norm[0]) / norm[1]


def augment(x: jax.Array, key: jax.Array, crop: int, flip: bool) -> jax.Array:
    """Random crops from the zero-padded images and random horizontal flips; x (batch, 28, 28, 1) uint8."""
    n = x.shape[0]
    k_crop, k_flip = jax.random.split(key)
    if crop:
        padded = jnp.pad(x, ((0, 0), (crop, crop), (crop, crop), (0, 0)))  # (batch, 28 + 2 crop, ..., 1)
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * crop + 1)
        cut = functools.partial(jax.lax.dynamic_slice, slice_sizes=(IMAGE_SIZE, IMAGE_SIZE, 1))
        x = jax.vmap(lambda img, o: cut(img, (o[0], o[1], 0)))(padded, offsets)
    if flip:
        mirrored = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        x = jnp.where(mirrored, x[:, :, ::-1], x)
    return x


def batch_at(settings: StepSettings, x_all, y_all, norm, perm, key, epoch, i) -> tuple[jax.Array, jax.Array]:
    """Training batch i of an epoch (shuffled by `perm`, augmented from `key`), normalised."""
    idx = jax.lax.dynamic_slice_in_dim(perm, i * settings.batch_size, settings.batch_size)
    x = x_all[idx]  # (batch, 28, 28, 1) uint8
    if settings.augment_crop or settings.augment_flip:
        x = augment(x, jax.random.fold_in(jax.random.fold_in(key, epoch), i), settings.augment_crop, settings.augment_flip)
    return normalise(x, norm), y_all[idx]


def _loss(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_update(apply: Callable, tx: optax.GradientTransformation, state: TrainState, x, y, lr, smoothing: float = 0.0):
    """One optimiser step on one batch: (new state, [summed loss, correct count]).

    `apply(variables, x, train=..., mutable=...)` is the model's apply; the batched path passes its
    masked model here too. The reported loss is the plain cross-entropy, whatever the smoothing."""

    def loss_fn(params):
        logits, updates = apply({"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"])
        return _loss(logits, y, smoothing).mean(), (logits, updates["batch_stats"])

    (_, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sums = jnp.stack([_loss(logits, y).sum(), (logits.argmax(-1) == y).sum().astype(jnp.float32)])
    return TrainState(params, stats, opt_state), sums


def masked_sums(logits: jax.Array, y: jax.Array, rows: jax.Array) -> jax.Array:
    """[summed loss, correct count] over the rows that belong to the split (eval chunks are padded)."""
    loss = jnp.where(rows, _loss(logits, y), 0.0).sum()
    correct = jnp.where(rows, logits.argmax(-1) == y, False).sum()
    return jnp.stack([loss, correct.astype(jnp.float32)])


def divergence(mean_loss: float, epoch: int) -> str | None:
    """Why an epoch's mean training loss means the run diverged, or None."""
    if math.isfinite(mean_loss) and mean_loss <= DIVERGED_LOSS:
        return None
    return f"train loss became {mean_loss:.4g} in epoch {epoch} (diverged; limit {DIVERGED_LOSS:g})"


def init_state(genome: Genome, cfg: TrainConfig, seed: int) -> TrainState:
    """Fresh variables (drawn on the host: no per-genome compile) and optax's initial optimiser state."""
    v = init_variables(genome, seed)
    opt_state = make_optimizer(cfg.optimizer, cfg.weight_decay).init(v["params"])
    return jax.device_put(TrainState(v["params"], v["batch_stats"], opt_state))


# ---------------------------------------------------------------------------
# Compiled programs, one pair per (genome, step settings, shapes, device)
# ---------------------------------------------------------------------------


class Programs(NamedTuple):
    step: Callable
    eval_chunk: Callable
    compile_seconds: float


def _on(device: Any, tree: Any) -> Any:
    """Abstract values of `tree` placed on `device` (what AOT lowering needs, without arrays)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(np.shape(s), s.dtype, sharding=sharding), tree)


def _eval_fn(genome: Genome, eval_batch: int) -> Callable:
    model = GenomeCNN(genome)

    def chunk(variables, acc, x_all, y_all, norm, start, stop):
        x = normalise(jax.lax.dynamic_slice_in_dim(x_all, start, eval_batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, eval_batch)
        rows = (start + jnp.arange(eval_batch)) < stop  # rows past the split do not count
        return acc + masked_sums(model.apply(variables, x, train=False), y, rows)

    return jax.jit(chunk, donate_argnums=(1,))


@functools.lru_cache(maxsize=PROGRAM_CACHE)
def _compiled_eval(genome: Genome, eval_shape: tuple[int, ...], eval_batch: int, device: Any) -> Callable:
    variables = _on(device, variable_shapes(genome))
    vec = jax.ShapeDtypeStruct((2,), jnp.float32)  # the accumulator, and the normalisation
    x, y = jax.ShapeDtypeStruct(eval_shape, jnp.uint8), jax.ShapeDtypeStruct(eval_shape[:1], jnp.int32)
    return _eval_fn(genome, eval_batch).lower(variables, *_on(device, (vec, x, y, vec)), 0, 0).compile()  # start/stop: Python ints


@functools.lru_cache(maxsize=PROGRAM_CACHE)
def _compiled_step(genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], device: Any) -> Callable:
    model, tx = GenomeCNN(genome), make_optimizer(settings.optimizer)

    def step(state: TrainState, acc: jax.Array, x_all, y_all, norm, perm, key, lr, epoch, i):
        x, y = batch_at(settings, x_all, y_all, norm, perm, key, epoch, i)
        state, sums = train_update(model.apply, tx, state, x, y, lr, settings.label_smoothing)
        return state, acc + sums

    v = variable_shapes(genome)
    state = TrainState(v["params"], v["batch_stats"], jax.eval_shape(tx.init, v["params"]))
    n, vec = train_shape[0], jax.ShapeDtypeStruct((2,), jnp.float32)
    arrays = (
        vec,
        jax.ShapeDtypeStruct(train_shape, jnp.uint8),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        vec,
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    key, lr = _on(device, jax.eval_shape(lambda: jax.random.key(0))), jax.ShapeDtypeStruct((), jnp.float32)
    return jax.jit(step, donate_argnums=(0, 1)).lower(_on(device, state), *_on(device, arrays), key, lr, 0, 0).compile()  # epoch, i: ints


def compiled_programs(genome: Genome, cfg: TrainConfig, dd: DeviceData) -> Programs:
    """AOT-compiled train step and eval chunk for this genome and these shapes (an in-process LRU cache).

    An in-process hit reports 0 compile seconds; a miss may still be fast when JAX's persistent
    cache has the program from an earlier process.
    """
    misses = _compiled_step.cache_info().misses + _compiled_eval.cache_info().misses
    t0 = time.perf_counter()
    step = _compiled_step(genome, cfg.step_settings(), tuple(dd.x_train.shape), dd.device)
    chunk = _compiled_eval(genome, tuple(dd.x_eval.shape), dd.eval_batch, dd.device)
    fresh = _compiled_step.cache_info().misses + _compiled_eval.cache_info().misses > misses
    return Programs(step, chunk, time.perf_counter() - t0 if fresh else 0.0)


def compiled_eval(genome: Genome, dd: DeviceData) -> Programs:
    """Only the eval chunk (for a trained model): the same program evaluation uses, so scores match."""
    return Programs(None, _compiled_eval(genome, tuple(dd.x_eval.shape), dd.eval_batch, dd.device), 0.0)


def evaluate_split(programs: Programs, variables: dict, dd: DeviceData, rows: tuple[int, int]) -> tuple[float, float]:
    """(mean loss, accuracy) of `variables` on eval rows [start, stop) (validation or test)."""
    start, stop = rows
    acc = jnp.zeros(2)
    for s in range(start, stop, dd.eval_batch):
        acc = programs.eval_chunk(variables, acc, dd.x_eval, dd.y_eval, dd.norm, s, stop)
    loss_sum, correct = np.asarray(acc)
    return float(loss_sum / (stop - start)), float(correct / (stop - start))


# ---------------------------------------------------------------------------
# One evaluation
# ---------------------------------------------------------------------------


def epoch_order(key: jax.Array, epoch: int, dd: DeviceData) -> jax.Array:
    """The epoch's shuffle of the real training rows, padded to the array's capacity (the padding is never reached)."""
    perm = jax.random.permutation(jax.random.fold_in(key, epoch + 1), dd.n_train)
    return jnp.pad(perm, (0, dd.x_train.shape[0] - dd.n_train))  # (capacity,)


def train_and_evaluate(
    genome: Genome,
    dd: DeviceData,
    cfg: TrainConfig,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    keep_variables: bool = False,
    test: bool = True,
) -> EvalResult:
    """Train `genome` for cfg.epochs and report train/val (and test) metrics; NaN/inf loss -> FAILED."""
    started = time.perf_counter()
    n_train = dd.n_train
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ValueError(f"trainer.batch_size {cfg.batch_size} exceeds the {n_train} training images")
    key = jax.random.key(seed)
    aug_key = jax.device_put(jax.random.fold_in(key, AUGMENT_STREAM), dd.device)
    state = init_state(genome, cfg, seed)
    lrs = lr_schedule(cfg, steps * cfg.epochs)
    result = EvalResult(str(genome), "FINISHED", count_params(genome), normalisation=tuple(np.asarray(dd.norm).tolist()))
    history: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
    hits = cache_hits()
    programs = compiled_programs(genome, cfg, dd)
    result.compile_seconds, result.cache_hits = programs.compile_seconds, cache_hits() - hits

    # TRAIN: steps dispatch asynchronously; one host sync per epoch reads the sums.
    train_time = 0.0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = epoch_order(key, epoch, dd)
        acc = jnp.zeros(2)
        for i in range(steps):
            state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, aug_key, lrs[epoch * steps + i], epoch, i)
        loss_sum, correct = np.asarray(acc)
        train_time += time.perf_counter() - t0
        seen = steps * cfg.batch_size
        if (reason := divergence(loss_sum / seen, epoch + 1)) is not None:
            result.status, result.reason = "FAILED", reason
            break
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        val_loss, val_acc = evaluate_split(programs, variables, dd, dd.val_range)
        row = {"train_loss": float(loss_sum / seen), "train_accuracy": float(correct / seen), "val_loss": val_loss, "val_accuracy": val_acc}
        for k, v in row.items():
            history[k].append(v)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)

    result.history = history
    result.train_seconds = train_time
    done_epochs = len(history["train_loss"]) + (result.status == "FAILED")
    result.images_trained = done_epochs * steps * cfg.batch_size
    result.images_per_second = result.images_trained / max(train_time, 1e-9)
    if result.status == "FAILED":
        return result
    if not math.isfinite(history["val_loss"][-1]):
        result.status, result.reason = "FAILED", f"validation loss is {history['val_loss'][-1]} (diverged)"
        return result
    # Keras' convention: the final train accuracy/loss are the last epoch's running averages.
    result.train_loss, result.train_accuracy = history["train_loss"][-1], history["train_accuracy"][-1]
    result.val_loss, result.val_accuracy = history["val_loss"][-1], history["val_accuracy"][-1]
    if test:
        _, result.test_accuracy = evaluate_split(programs, variables, dd, dd.test_range)
    if keep_variables:
        result.variables = jax.tree_util.tree_map(np.asarray, variables)
    result.wall_seconds = time.perf_counter() - started
    return result
