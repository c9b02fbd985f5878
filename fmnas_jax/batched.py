"""Several genomes of one shape trained as one vmapped program (an accelerator path; opt-in).

Genomes that share every layer's type, filters and kernel size differ only in activations, which
are chosen here by index (`lax.switch`; under `vmap` a select over the five). A hill climber's
neighbourhood is mostly such genomes (20 of a genome's ~32 neighbours only change an activation).
Each model keeps its own parameters, optimiser state and BatchNorm statistics and sees exactly the
batches its solo run would see, so the results equal solo training up to float rounding (tested).

On XLA:CPU vmapped convolutions ran 2.5-5x slower than one model after another (NOTES.md), so this
is not used on CPU; on a GPU it is unmeasured so far (scripts/bench_gpu.sh measures it).
Imports jax/flax/optax/numpy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax.genome import ACTIVATIONS, HEAD_UNITS, NUM_CLASSES, Genome, count_params
from fmnas_jax.model import ACTIVATION_FNS, BN_MOMENTUM
from fmnas_jax.train import DIVERGED_LOSS, DeviceData, EvalResult, TrainConfig, _loss, _normalise, init_state, lr_schedule, make_optimizer

Signature = tuple[tuple[str, int, int], ...]


def signature(genome: Genome) -> Signature:
    """What fixes the shapes of a genome's arrays: (type, filters, kernel) per conv."""
    return tuple((c.kind, c.filters, c.kernel) for c in genome.convs)


def activation_indices(genome: Genome) -> list[int]:
    """Index into ACTIVATIONS of each conv's activation, then the head's."""
    return [ACTIVATIONS.index(c.activation) for c in genome.convs] + [ACTIVATIONS.index(genome.head_activation)]


def _act(index: jax.Array, x: jax.Array) -> jax.Array:
    return jax.lax.switch(index, [ACTIVATION_FNS[a] for a in ACTIVATIONS], x)


class ShapeCNN(nn.Module):
    """GenomeCNN with activations given at call time; same variable tree as GenomeCNN."""

    sig: Signature

    @nn.compact
    def __call__(self, x: jax.Array, acts: jax.Array, train: bool) -> jax.Array:
        for i, (kind, filters, kernel) in enumerate(self.sig):
            stride, padding = (1, "SAME") if kind == "NC" else (2, "VALID")
            x = nn.Conv(filters, (kernel, kernel), strides=stride, padding=padding)(x)
            x = _act(acts[i], x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
        x = x.mean(axis=(1, 2))
        x = _act(acts[-1], nn.Dense(HEAD_UNITS)(x))
        return nn.Dense(NUM_CLASSES)(x)


def _programs(sig: Signature, cfg: TrainConfig, eval_batch: int) -> tuple:
    model, tx, batch = ShapeCNN(sig), make_optimizer(cfg), cfg.batch_size

    def one_step(state, acts, x, y, lr):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, x, acts, train=True, mutable=["batch_stats"])
            return _loss(logits, y).mean(), (logits, updates["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, d: p - lr * d, state.params, direction)
        correct = (logits.argmax(-1) == y).sum().astype(jnp.float32)
        return type(state)(params, stats, opt_state), jnp.stack([loss * batch, correct])

    def step(state, acc, acts, x_all, y_all, norm, perm, lr, i):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
        x, y = _normalise(x_all[idx], norm), y_all[idx]  # one batch, shared by every model
        state, sums = jax.vmap(one_step, in_axes=(0, 0, None, None, None))(state, acts, x, y, lr)
        return state, acc + sums  # acc: (models, 2)

    def one_eval(variables, acts, x, y, mask):
        logits = model.apply(variables, x, acts, train=False)
        return jnp.stack([jnp.where(mask, _loss(logits, y), 0.0).sum(), jnp.where(mask, logits.argmax(-1) == y, False).sum()])

    def eval_chunk(variables, acc, acts, x_all, y_all, norm, start, stop):
        x = _normalise(jax.lax.dynamic_slice_in_dim(x_all, start, eval_batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, eval_batch)
        mask = (start + jnp.arange(eval_batch)) < stop
        return acc + jax.vmap(one_eval, in_axes=(0, 0, None, None, None))(variables, acts, x, y, mask).astype(jnp.float32)

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(eval_chunk)


def _evaluate(eval_chunk, variables, acts, dd: DeviceData, rows: tuple[int, int], models: int) -> np.ndarray:
    start, stop = rows
    acc = jnp.zeros((models, 2))
    for s in range(start, stop, dd.eval_batch):
        acc = eval_chunk(variables, acc, acts, dd.x_eval, dd.y_eval, dd.norm, s, stop)
    return np.asarray(acc) / (stop - start)  # (models, 2): mean loss, accuracy


def train_batched(genomes: Sequence[Genome], dd: DeviceData, cfg: TrainConfig, seed: int) -> list[EvalResult]:
    """Train genomes of one signature together; one EvalResult each, as train_and_evaluate would give."""
    sig = signature(genomes[0])
    if any(signature(g) != sig for g in genomes):
        raise ValueError("train_batched needs genomes of one shape signature (types, filters, kernels)")
    n, m = int(dd.y_train.shape[0]), len(genomes)
    steps = n // cfg.batch_size
    key, lrs = jax.random.key(seed), lr_schedule(cfg, steps * cfg.epochs)
    states = [init_state(g, cfg, seed) for g in genomes]
    state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)  # (models, ...) per leaf
    acts = jnp.asarray([activation_indices(g) for g in genomes], jnp.int32)
    t0 = time.perf_counter()
    step, eval_chunk = _programs(sig, cfg, dd.eval_batch)
    norm = tuple(np.asarray(dd.norm).tolist())
    results = [EvalResult(str(g), "FINISHED", count_params(g), normalisation=norm) for g in genomes]
    histories = [{k: [] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")} for _ in genomes]

    train_time = 0.0
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        perm = jax.random.permutation(jax.random.fold_in(key, epoch + 1), n)  # the solo runs' order
        acc = jnp.zeros((m, 2))
        for i in range(steps):
            state, acc = step(state, acc, acts, dd.x_train, dd.y_train, dd.norm, perm, lrs[epoch * steps + i], i)
        sums = np.asarray(acc) / (steps * cfg.batch_size)
        train_time += time.perf_counter() - t
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        val = _evaluate(eval_chunk, variables, acts, dd, dd.val_range, m)
        for j, r in enumerate(results):
            if r.status == "FAILED":
                continue  # a diverged model keeps computing alongside the others but is no longer reported
            if not math.isfinite(sums[j, 0]) or sums[j, 0] > DIVERGED_LOSS:
                r.status, r.reason = (
                    "FAILED",
                    f"train loss became {sums[j, 0]:.4g} in epoch {epoch + 1} (diverged; limit {DIVERGED_LOSS:g})",
                )
                continue
            for k, v in zip(histories[j], (sums[j, 0], sums[j, 1], val[j, 0], val[j, 1]), strict=True):
                histories[j][k].append(float(v))
    test = _evaluate(eval_chunk, {"params": state.params, "batch_stats": state.batch_stats}, acts, dd, dd.test_range, m)
    elapsed = time.perf_counter() - t0
    for j, r in enumerate(results):
        h = r.history = histories[j]
        r.train_seconds = train_time / m  # the group's time, shared out
        r.compile_seconds = max(elapsed - train_time, 0.0) / m
        r.images_per_second = steps * cfg.batch_size * cfg.epochs * m / max(train_time, 1e-9)
        if r.status == "FINISHED":
            r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy = (h[k][-1] for k in h)
            r.test_accuracy = float(test[j, 1])
    return results
