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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnas_jax.data import Dataset
from fmnas_jax.genome import Genome, count_params
from fmnas_jax.model import GenomeCNN, init_variables

OPTIMIZERS = ("adam", "adamw", "sgd")
# Mean training cross-entropy above which a run counts as diverged (chance level is ln 10 = 2.3):
# Adam bounds each update, so a far too large learning rate can leave the loss huge but finite.
DIVERGED_LOSS = 1e4
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training budget and optimiser; everything except `save` and `eval_batch_size` changes results."""

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
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

    def result_settings(self) -> dict:
        """Settings that change an evaluation's result (for the eval key)."""
        d = asdict(self)
        del d["save"], d["eval_batch_size"]
        return d


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
    history: dict[str, list[float]] = field(default_factory=dict)
    variables: Any = None  # numpy tree {'params', 'batch_stats'} when kept
    normalisation: tuple[float, float] = (0.0, 1.0)

    def metrics(self) -> dict[str, float]:
        """Final scalar metrics, by MLflow name."""
        keys = ("param_count", "train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss")
        keys += ("compile_seconds", "cache_hits", "train_seconds", "images_per_second")
        return {k: float(getattr(self, k)) for k in keys if math.isfinite(float(getattr(self, k)))}


class DeviceData(NamedTuple):
    """A Dataset placed on the device once. Validation and test share one padded eval array
    (val rows first), so a single compiled eval program serves both."""

    x_train: jax.Array  # (N, 28, 28, 1) uint8
    y_train: jax.Array  # (N,) int32
    x_eval: jax.Array  # (V + T + padding, 28, 28, 1) uint8
    y_eval: jax.Array
    n_val: int
    n_test: int
    norm: jax.Array  # (2,) mean, std of the training split
    eval_batch: int

    @property
    def val_range(self) -> tuple[int, int]:
        return 0, self.n_val

    @property
    def test_range(self) -> tuple[int, int]:
        return self.n_val, self.n_val + self.n_test


def to_device(data: Dataset, eval_batch: int = 1000) -> DeviceData:
    """Put every split on the default device (uint8 images: 47 MB for all of Fashion-MNIST)."""
    x_eval = np.concatenate([data.x_val, data.x_test])
    y_eval = np.concatenate([data.y_val, data.y_test])
    extra = -len(y_eval) % eval_batch + eval_batch  # room for a chunk that starts anywhere
    x_eval = np.concatenate([x_eval, np.zeros((extra, *x_eval.shape[1:]), np.uint8)])
    y_eval = np.concatenate([y_eval, np.zeros(extra, np.int32)])
    norm = np.asarray([data.mean, data.std], np.float32)
    return DeviceData(
        jax.device_put(data.x_train),
        jax.device_put(data.y_train),
        jax.device_put(x_eval),
        jax.device_put(y_eval),
        len(data.y_val),
        len(data.y_test),
        jax.device_put(norm),
        eval_batch,
    )


_CACHE_EVENTS = {"hits": 0}  # programs this process loaded from the persistent cache


def _count_cache_event(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_EVENTS["hits"] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def enable_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent cache for every program (the 1 s default skips small steps)."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------
# Compiled functions, one set per (genome, optimiser, shapes)
# ---------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The update direction; the step scales it by the scheduled learning rate."""
    if cfg.optimizer == "sgd":
        return optax.trace(decay=0.9, nesterov=True)
    if cfg.optimizer == "adamw":
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay))
    return optax.scale_by_adam()


def lr_schedule(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """Per-step learning rates, (total_steps,) float32. Fed to the step as a scalar, so that
    budgets of different lengths share one compiled program."""
    if cfg.schedule == "constant":
        return np.full(total_steps, cfg.learning_rate, np.float32)
    t = np.arange(total_steps) / max(total_steps, 1)
    return (cfg.learning_rate * 0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def _normalise(x: jax.Array, norm: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) / 255.0 - norm[0]) / norm[1]


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_update(apply: Callable, tx: optax.GradientTransformation, state: TrainState, x: jax.Array, y: jax.Array, lr: jax.Array):
    """One optimiser step on one batch: (new state, [summed loss, correct count]).

    `apply(variables, x, train=..., mutable=...)` is the model's apply; the batched path passes its
    masked model here too, so a bucket computes exactly what solo training computes."""

    def loss_fn(params):
        logits, updates = apply({"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"])
        return _loss(logits, y).mean(), (logits, updates["batch_stats"])

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, d: p - lr * d, state.params, direction)
    correct = (logits.argmax(-1) == y).sum()
    return TrainState(params, stats, opt_state), jnp.stack([loss * y.shape[0], correct.astype(jnp.float32)])


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


def _step_fn(genome: Genome, cfg: TrainConfig) -> Callable:
    model, tx = GenomeCNN(genome), make_optimizer(cfg)
    batch = cfg.batch_size

    def step(state: TrainState, acc: jax.Array, x_all, y_all, norm, perm, lr, i):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
        x, y = _normalise(x_all[idx], norm), y_all[idx]  # (batch, 28, 28, 1), (batch,)
        state, sums = train_update(model.apply, tx, state, x, y, lr)
        return state, acc + sums

    return jax.jit(step, donate_argnums=(0, 1))


def _eval_fn(genome: Genome, eval_batch: int) -> Callable:
    model = GenomeCNN(genome)

    def chunk(variables, acc, x_all, y_all, norm, start, stop):
        x = _normalise(jax.lax.dynamic_slice_in_dim(x_all, start, eval_batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, eval_batch)
        rows = (start + jnp.arange(eval_batch)) < stop  # rows past the split do not count
        return acc + masked_sums(model.apply(variables, x, train=False), y, rows)

    return jax.jit(chunk, donate_argnums=(1,))


def init_state(genome: Genome, cfg: TrainConfig, seed: int) -> TrainState:
    """Fresh variables and optimiser state, built on the host (no per-genome compile)."""
    v = init_variables(genome, seed)
    opt_shapes = jax.eval_shape(make_optimizer(cfg).init, v["params"])
    opt_state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), opt_shapes)  # Adam/SGD state starts at 0
    return jax.device_put(TrainState(v["params"], v["batch_stats"], opt_state))


class Programs(NamedTuple):
    step: Callable
    eval_chunk: Callable
    compile_seconds: float


_PROGRAMS: dict[tuple, Programs] = {}


def compiled_programs(genome: Genome, cfg: TrainConfig, state: TrainState, dd: DeviceData) -> Programs:
    """AOT-compiled train step and eval chunk for this genome and these shapes, cached in-process.

    A cache hit reports 0 compile seconds; a miss may still be fast when JAX's persistent
    cache has the program from an earlier process.
    """
    device = next(iter(dd.x_train.devices()))  # programs are compiled for the device the data sit on
    key = (genome, cfg.optimizer, cfg.weight_decay, cfg.batch_size, dd.x_train.shape, dd.x_eval.shape, dd.eval_batch, device)
    if key in _PROGRAMS:
        return _PROGRAMS[key]._replace(compile_seconds=0.0)
    t0 = time.perf_counter()
    acc, lr = jnp.zeros(2), jnp.float32(0)
    perm = jnp.arange(dd.x_train.shape[0])
    step = _step_fn(genome, cfg).lower(state, acc, dd.x_train, dd.y_train, dd.norm, perm, lr, 0).compile()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    chunk = _eval_fn(genome, dd.eval_batch).lower(variables, acc, dd.x_eval, dd.y_eval, dd.norm, 0, 0).compile()
    programs = Programs(step, chunk, time.perf_counter() - t0)
    if len(_PROGRAMS) > 256:
        _PROGRAMS.clear()
    _PROGRAMS[key] = programs
    return programs


def compiled_eval(genome: Genome, variables: dict, dd: DeviceData) -> Programs:
    """Only the eval chunk (for a trained model): the same program evaluation uses, so scores match."""
    key = (genome, "eval", dd.x_eval.shape, dd.eval_batch, next(iter(dd.x_eval.devices())))
    if key not in _PROGRAMS:
        t0 = time.perf_counter()
        chunk = _eval_fn(genome, dd.eval_batch).lower(variables, jnp.zeros(2), dd.x_eval, dd.y_eval, dd.norm, 0, 0).compile()
        _PROGRAMS[key] = Programs(None, chunk, time.perf_counter() - t0)
    return _PROGRAMS[key]


@functools.lru_cache(maxsize=16)
def _predict_fn(genome: Genome) -> Callable:
    model = GenomeCNN(genome)
    return jax.jit(lambda variables, x, norm: model.apply(variables, _normalise(x, norm), train=False).argmax(-1))


def predict_classes(
    genome: Genome, variables: dict, normalisation: tuple[float, float], images: np.ndarray, batch: int = 1000
) -> np.ndarray:
    """Class ids (N,) for images (N, 28, 28, 1) given as uint8 0..255 (or floats on that scale)."""
    x = np.asarray(images)
    n = len(x)
    pad = -n % batch
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    norm, fn = jnp.asarray(normalisation, jnp.float32), _predict_fn(genome)
    out = [fn(variables, jnp.asarray(x[i : i + batch]), norm) for i in range(0, len(x), batch)]  # (batch,) each
    return np.concatenate([np.asarray(o) for o in out])[:n].astype(np.int64)


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


def train_and_evaluate(
    genome: Genome,
    dd: DeviceData,
    cfg: TrainConfig,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    keep_variables: bool = False,
) -> EvalResult:
    """Train `genome` for cfg.epochs and report train/val/test metrics; NaN/inf loss -> FAILED."""
    n_train = int(dd.y_train.shape[0])
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ValueError(f"trainer.batch_size {cfg.batch_size} exceeds the {n_train} training images")
    key = jax.random.key(seed)
    state = init_state(genome, cfg, seed)
    lrs = lr_schedule(cfg, steps * cfg.epochs)
    result = EvalResult(str(genome), "FINISHED", count_params(genome), normalisation=tuple(np.asarray(dd.norm).tolist()))
    history: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
    hits = _CACHE_EVENTS["hits"]
    programs = compiled_programs(genome, cfg, state, dd)
    result.compile_seconds, result.cache_hits = programs.compile_seconds, _CACHE_EVENTS["hits"] - hits

    # TRAIN: steps dispatch asynchronously; one host sync per epoch reads the sums.
    train_time = 0.0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = jax.random.permutation(jax.random.fold_in(key, epoch + 1), n_train)
        acc = jnp.zeros(2)
        for i in range(steps):
            state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, lrs[epoch * steps + i], i)
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
    result.images_per_second = done_epochs * steps * cfg.batch_size / max(train_time, 1e-9)
    if result.status == "FAILED":
        return result
    if not math.isfinite(history["val_loss"][-1]):
        result.status, result.reason = "FAILED", f"validation loss is {history['val_loss'][-1]} (diverged)"
        return result
    # Keras' convention: the final train accuracy/loss are the last epoch's running averages.
    result.train_loss, result.train_accuracy = history["train_loss"][-1], history["train_accuracy"][-1]
    result.val_loss, result.val_accuracy = history["val_loss"][-1], history["val_accuracy"][-1]
    _, result.test_accuracy = evaluate_split(programs, variables, dd, dd.test_range)
    if keep_variables:
        result.variables = jax.tree_util.tree_map(np.asarray, variables)
    return result


def platform_summary() -> str:
    """e.g. 'cpu (2 devices)' or 'gpu: NVIDIA H100 80GB HBM3'."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()}: {', '.join(kinds)} x{len(devices)}"
