"""Training and evaluation of one genome on a device-resident dataset.

Imports jax/flax/optax/numpy only, so it runs on a bare accelerator image.

Loop structure: a step composed of small compiled pieces (fmnas_jax.programs), called from a Python
loop. On XLA:CPU a step inside `lax.scan` ran ~15x slower (weight-gradient convolutions in a
while-loop body get a slow layout); see docs/benchmarks.md. Pieces dispatch asynchronously, and the
host syncs once per epoch to read the loss, so the Python loop costs little on an accelerator as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax.data import Dataset, Normalisation, as_normalisation
from fmnas_jax.genome import FASHION_MNIST, Genome, ImageShape, count_params
from fmnas_jax.model import init_variables
from fmnas_jax.ops import (  # noqa: F401  (re-exported: the batched path and the tests use them)
    StepSettings,
    augment,
    batch_at,
    cross_entropy,
    init_opt_state,
    make_optimizer,
    masked_sums,
    normalise,
)
from fmnas_jax.programs import EvalPlan, FusedPlan, Plan, TrainState
from fmnas_jax.recipe import TrainConfig
from fmnas_jax.runtime import cache_hits

# Mean training cross-entropy above which a run counts as diverged (chance level is ln 10 = 2.3):
# Adam bounds each update, so a far too large learning rate can leave the loss huge but finite.
DIVERGED_LOSS = 1e4
AUGMENT_STREAM = 0xA06  # fold_in constant: the augmentation's random stream, apart from init and shuffling
TRAIN_CAPACITY = 55_000  # training rows on the device (padded): every training subset fits, so all share one step


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
    cache_hits: int = 0  # programs loaded from a persistent cache (JAX's, or the compiled pieces') instead of compiled
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    images_trained: int = 0  # epochs x images per epoch (what the cost model predicts from)
    wall_seconds: float = 0.0  # the whole evaluation: compile, training, validation and test
    history: dict[str, list[float]] = field(default_factory=dict)
    variables: Any = None  # numpy tree {'params', 'batch_stats'} when kept
    normalisation: Normalisation = ((0.0,), (1.0,))
    node: str | None = None  # the cluster node it trained on (backend=ray: Ray's node id)

    def summary(self) -> dict[str, float]:
        """The final scalar values (finite ones only)."""
        keys = ("param_count", "train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss")
        keys += ("compile_seconds", "cache_hits", "train_seconds", "images_per_second", "images_trained", "wall_seconds")
        return {k: float(getattr(self, k)) for k in keys if math.isfinite(float(getattr(self, k)))}


def failed(genome: Genome, reason: str, image: ImageShape = FASHION_MNIST) -> EvalResult:
    """A FAILED result for a genome that could not be evaluated."""
    return EvalResult(str(genome), "FAILED", count_params(genome, image), reason=reason)


class DeviceData(NamedTuple):
    """A Dataset placed on the device once. Validation and test share one padded eval array
    (val rows first), so a single compiled eval program serves both."""

    x_train: jax.Array  # (capacity, height, width, channels) uint8: the N training images, then zero padding
    y_train: jax.Array  # (capacity,) int32
    x_eval: jax.Array  # (V + T + padding, height, width, channels) uint8
    y_eval: jax.Array
    n_val: int
    n_test: int
    norm: jax.Array  # (2, channels): the training split's mean and std per channel
    eval_batch: int
    n_train: int  # real training images (batches are drawn from the first n_train rows only)
    classes: int = 10

    @property
    def image(self) -> ImageShape:
        return ImageShape(*self.x_train.shape[1:], self.classes)

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

    The training split is zero-padded to a capacity that fits every training subset of the data (55,000 for
    Fashion-MNIST), so the cheap rungs of a multi-fidelity search, the full budget and the final retrain of one
    genome share one compiled train step (its shapes no longer depend on data.train_size)."""
    n = len(data.y_train)
    capacity = max(min(TRAIN_CAPACITY, data.pool), n)
    x_train = np.concatenate([data.x_train, np.zeros((capacity - n, *data.x_train.shape[1:]), np.uint8)])
    y_train = np.concatenate([data.y_train, np.zeros(capacity - n, np.int32)])
    x_eval = np.concatenate([data.x_val, data.x_test])
    y_eval = np.concatenate([data.y_val, data.y_test])
    extra = -len(y_eval) % eval_batch + eval_batch  # room for a chunk that starts anywhere
    x_eval = np.concatenate([x_eval, np.zeros((extra, *x_eval.shape[1:]), np.uint8)])
    y_eval = np.concatenate([y_eval, np.zeros(extra, np.int32)])
    norm = np.asarray(data.normalisation, np.float32)
    put = jax.device_put
    return DeviceData(put(x_train), put(y_train), put(x_eval), put(y_eval), len(data.y_val), len(data.y_test), put(norm), eval_batch,
                      n, len(data.classes))  # fmt: skip


def lr_schedule(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """Per-step learning rates, (total_steps,) float32, computed on the host. Fed to the step as a
    scalar, so that budgets of different lengths share one compiled program."""
    steps = np.arange(total_steps, dtype=np.float64)
    if cfg.schedule == "constant":
        return np.full(total_steps, cfg.learning_rate, np.float32)
    # optax.cosine_decay_schedule(lr, total_steps) with alpha 0, in NumPy: an eager jax.vmap of the schedule
    # compiled a program per distinct length (every budget) in every worker.
    return (cfg.learning_rate * 0.5 * (1 + np.cos(np.pi * np.minimum(steps, max(total_steps, 1)) / max(total_steps, 1)))).astype(np.float32)


def epochs_that_fit(done: int, planned: int, epoch_seconds: Sequence[float], seconds_left: float, reserve: float = 0.0) -> int:
    """The total epochs a training under a deadline should plan for after `done` of them: `planned` when the rest
    fits the `seconds_left`, fewer when not (never fewer than `done`, never fewer than 1). The epoch's cost is the
    median of the last three measured (`epoch_seconds`, one per epoch done) after the first: the first carries the
    data's first touch (measured up to 2.4x a steady epoch), so on its own it cuts nothing unless the deadline has
    passed, and one slow epoch later (a noisy neighbour) does not cut the plan either. `reserve`: seconds kept back
    after the last epoch (the test pass)."""
    steady = list(epoch_seconds[1:])
    if not steady:
        return planned if seconds_left > reserve else max(done, 1)
    per_epoch = float(np.median(steady[-3:]))
    more = int(max(seconds_left - reserve, 0.0) // max(per_epoch, 1e-9))
    return max(done, 1, min(planned, done + more))


def replanned_lrs(cfg: TrainConfig, lrs: np.ndarray, steps_per_epoch: int, done: int, total: int) -> np.ndarray:
    """The per-step learning rates when a training of cfg.epochs is re-planned to `total` epochs after `done`: the
    steps already taken keep theirs, the rest follow the schedule of a `total`-epoch training, so the cosine decays
    to its end at the new last step instead of being cut off halfway."""
    if total * steps_per_epoch == len(lrs):
        return lrs
    return np.concatenate([lrs[: done * steps_per_epoch], lr_schedule(cfg, total * steps_per_epoch)[done * steps_per_epoch :]])


def divergence(mean_loss: float, epoch: int) -> str | None:
    """Why an epoch's mean training loss means the run diverged, or None."""
    if math.isfinite(mean_loss) and mean_loss <= DIVERGED_LOSS:
        return None
    return f"train loss became {mean_loss:.4g} in epoch {epoch} (diverged; limit {DIVERGED_LOSS:g})"


def init_state(genome: Genome, cfg: TrainConfig, seed: int, image: ImageShape = FASHION_MNIST) -> TrainState:
    """Fresh variables (drawn on the host: no per-genome compile) and optax's initial state of every parameter."""
    v = init_variables(genome, seed, image)
    return jax.device_put(TrainState(v["params"], v["batch_stats"], init_opt_state(v["params"], cfg.optimizer, cfg.weight_decay)))


# ---------------------------------------------------------------------------
# Compiled programs: a genome's plan of shared pieces (fmnas_jax.programs)
# ---------------------------------------------------------------------------


class Programs(NamedTuple):
    step: Callable | None
    eval: EvalPlan
    compile_seconds: float


def eval_chunk_size(batch_size: int, dd: DeviceData) -> int:
    """Rows per eval chunk: the training batch (so eval reuses the training convolutions), within the eval padding."""
    return min(batch_size, dd.eval_batch)


def compiled_programs(genome: Genome, cfg: TrainConfig, dd: DeviceData, fused: bool = False) -> Programs:
    """The compiled pieces of this genome's train step and eval chunk (shared with every genome that needs
    the same piece), or with `fused` one program each for the whole step and chunk (see programs.FusedPlan);
    `compile_seconds` counts only what this call compiled."""
    chunk = eval_chunk_size(cfg.batch_size, dd)
    kind = FusedPlan if fused else Plan
    plan = kind(genome, cfg.step_settings(), tuple(dd.x_train.shape), tuple(dd.x_eval.shape), chunk, dd.device, classes=dd.classes)
    return Programs(plan.step, plan.eval, plan.compile_seconds)


def compiled_eval(genome: Genome, dd: DeviceData, batch_size: int = 128) -> Programs:
    """Only the eval pieces (for a trained model): the ones evaluation uses, so scores match."""
    plan = EvalPlan(genome, eval_chunk_size(batch_size, dd), dd.device, image=dd.image)
    return Programs(None, plan, plan.compile_seconds)


def evaluate_split(programs: Programs, variables: dict, dd: DeviceData, rows: tuple[int, int]) -> tuple[float, float]:
    """(mean loss, accuracy) of `variables` on eval rows [start, stop) (validation or test)."""
    start, stop = rows
    acc = jnp.zeros(2)
    for s in range(start, stop, programs.eval.chunk):
        acc = programs.eval.eval_chunk(variables, acc, dd.x_eval, dd.y_eval, dd.norm, s, stop)
    loss_sum, correct = np.asarray(acc)
    return float(loss_sum / (stop - start)), float(correct / (stop - start))


# ---------------------------------------------------------------------------
# One evaluation
# ---------------------------------------------------------------------------


def epoch_order(key: jax.Array, epoch: int, dd: DeviceData) -> jax.Array:
    """The epoch's shuffle of the real training rows, padded to the array's capacity (the padding is never reached)."""
    perm = jax.random.permutation(jax.random.fold_in(key, epoch + 1), dd.n_train)
    return jnp.pad(perm, (0, dd.x_train.shape[0] - dd.n_train))  # (capacity,)


HISTORY = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # per epoch, in EvalResult.history


def variables_of(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def fit(
    step: Callable,
    evaluate: Callable[[dict, tuple[int, int]], np.ndarray],
    state: TrainState,
    results: Sequence[EvalResult],
    dd: DeviceData,
    cfg: TrainConfig,
    seed: int,
    acc_shape: tuple[int, ...] = (2,),
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> tuple[TrainState, float]:
    """The training loop of one model (train_and_evaluate) or of a bucket of them (fmnas_jax.batched):
    `state` holds the models of `results` (one each), `step(state, acc, perm, aug_key, lr, epoch, i)`
    trains one batch and adds its (loss, correct) sums to `acc` (zeros of `acc_shape` each epoch),
    `evaluate(variables, rows)` gives each model's (mean loss, accuracy), shape (models, 2). Steps
    dispatch asynchronously; one host sync per epoch reads the sums. Fills each result's history and
    images_trained; a model whose training loss diverged is FAILED (a bucket's others go on).
    `deadline` (a time.monotonic() value): after every epoch the remaining epochs are re-planned from the
    measured epochs (epochs_that_fit, with one more validation-sized pass kept back for the test), and the
    learning-rate schedule with them (replanned_lrs), so that training and its test end by then; at least one
    epoch is trained, and never more than cfg.epochs. Returns the final state and the seconds spent in training
    steps."""
    steps = dd.n_train // cfg.batch_size
    seen = steps * cfg.batch_size
    key = jax.random.key(seed)
    aug_key = jax.device_put(jax.random.fold_in(key, AUGMENT_STREAM), dd.device)
    lrs = lr_schedule(cfg, steps * cfg.epochs)
    for r in results:
        r.history = {k: [] for k in HISTORY}
    train_time, total, epoch_seconds, epoch = 0.0, cfg.epochs, [], 0
    while epoch < total:
        t0 = time.perf_counter()
        perm = epoch_order(key, epoch, dd)
        acc = jnp.zeros(acc_shape)
        for i in range(steps):
            state, acc = step(state, acc, perm, aug_key, lrs[epoch * steps + i], epoch, i)
        sums = np.asarray(acc).reshape(-1, 2) / seen  # (models, 2): mean loss, accuracy
        train_time += time.perf_counter() - t0
        for r, loss in zip(results, sums[:, 0], strict=True):
            if r.status == "FINISHED" and (reason := divergence(float(loss), epoch + 1)) is not None:
                r.status, r.reason = "FAILED", reason  # a diverged model of a bucket computes on but is no longer reported
        live = [j for j, r in enumerate(results) if r.status == "FINISHED"]
        if not live:
            break
        t_val = time.perf_counter()
        val = evaluate(variables_of(state), dd.val_range)
        epoch += 1
        plan = {}
        if deadline is not None:
            epoch_seconds.append(time.perf_counter() - t0)
            total, lrs = _replan(cfg, lrs, steps, epoch, epoch_seconds, deadline, time.perf_counter() - t_val, dd)
            plan = {"epochs_planned": float(total)}  # streamed with the epoch: the progress bar's new total, a curve in MLflow
        _record(results, live, sums, val, epoch, plan, on_epoch)
    for r in results:
        r.images_trained = (len(r.history["train_loss"]) + (r.status == "FAILED")) * seen
    return state, train_time


def _record(results: Sequence[EvalResult], live: list[int], sums: np.ndarray, val: np.ndarray, epoch: int, plan: dict[str, float],
            on_epoch: Callable[[int, dict[str, float]], None] | None) -> None:  # fmt: skip
    """Each live model's epoch (train and validation loss and accuracy) into its history, and to `on_epoch`."""
    for j in live:
        row = dict(zip(HISTORY, (float(v) for v in (*sums[j], *val[j])), strict=True))
        for k, v in row.items():
            results[j].history[k].append(v)
        if on_epoch is not None:
            on_epoch(epoch, row | plan)


def _replan(cfg: TrainConfig, lrs: np.ndarray, steps: int, done: int, epoch_seconds: list[float], deadline: float,
            val_seconds: float, dd: DeviceData) -> tuple[int, np.ndarray]:  # fmt: skip
    """(epochs to train in all, their per-step learning rates) after `done` epochs under `deadline`, keeping back the
    test pass (the validation pass's seconds scaled to the test split)."""
    test_pass = val_seconds * (dd.test_range[1] - dd.test_range[0]) / max(dd.val_range[1] - dd.val_range[0], 1)
    total = epochs_that_fit(done, cfg.epochs, epoch_seconds, deadline - time.monotonic(), test_pass)
    return total, replanned_lrs(cfg, lrs, steps, done, total)


def finish(results: Sequence[EvalResult], evaluate: Callable, variables: dict, dd: DeviceData, test: bool) -> None:
    """Each trained model's final metrics, for solo and bucket training alike: the last epoch's (Keras'
    convention: train accuracy/loss are the last epoch's running averages), FAILED if its validation loss
    diverged, and test accuracy when `test` (one evaluation pass for every model of `variables`)."""
    for r in results:
        if r.status == "FINISHED" and not math.isfinite(r.history["val_loss"][-1]):
            r.status, r.reason = "FAILED", f"validation loss is {r.history['val_loss'][-1]} (diverged)"
    live = [j for j, r in enumerate(results) if r.status == "FINISHED"]
    tested = evaluate(variables, dd.test_range) if test and live else None
    for j in live:
        r = results[j]
        r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy = (r.history[k][-1] for k in HISTORY)
        if tested is not None:
            r.test_accuracy = float(tested[j, 1])


def train_and_evaluate(
    genome: Genome,
    dd: DeviceData,
    cfg: TrainConfig,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    keep_variables: bool = False,
    test: bool = True,
    fused: bool = False,
    deadline: float | None = None,
) -> EvalResult:
    """Train `genome` for cfg.epochs and report train/val (and test) metrics; NaN/inf loss -> FAILED.

    `fused`: one compiled program for the whole step (for a process whose XLA has several threads).
    `deadline` (a time.monotonic() value): train the epochs that end by then, at least one (see `fit`)."""
    started = time.perf_counter()
    if dd.n_train // cfg.batch_size < 1:
        raise ValueError(f"trainer.batch_size {cfg.batch_size} exceeds the {dd.n_train} training images")
    state = init_state(genome, cfg, seed, dd.image)
    result = EvalResult(str(genome), "FINISHED", count_params(genome, dd.image), normalisation=as_normalisation(np.asarray(dd.norm)))
    hits = cache_hits()
    programs = compiled_programs(genome, cfg, dd, fused)
    result.compile_seconds, result.cache_hits = programs.compile_seconds, cache_hits() - hits

    def step(state: TrainState, acc: jax.Array, perm: jax.Array, aug_key: jax.Array, lr: float, epoch: int, i: int) -> tuple:
        return programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, aug_key, lr, epoch, i)

    def evaluate(variables: dict, rows: tuple[int, int]) -> np.ndarray:
        return np.array([evaluate_split(programs, variables, dd, rows)])

    state, result.train_seconds = fit(step, evaluate, state, [result], dd, cfg, seed, on_epoch=on_epoch, deadline=deadline)
    result.images_per_second = result.images_trained / max(result.train_seconds, 1e-9)
    variables = variables_of(state)
    finish([result], evaluate, variables, dd, test)
    if keep_variables and result.status == "FINISHED":
        result.variables = jax.tree_util.tree_map(np.asarray, variables)
    result.wall_seconds = time.perf_counter() - started
    return result
