"""The arithmetic of a training step as pure functions: batches, augmentation, loss, the layers, the optimiser.

Shared by the composed pieces (fmnas_jax.pieces), the fused plan and the batched path, so every path
computes the same thing. Imports jax/flax/optax/numpy only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnas_jax.genome import ConvGene
from fmnas_jax.model import ACTIVATION_FNS, BN_MOMENTUM

F32 = jnp.float32


def sds(shape: tuple[int, ...], dtype: Any = F32) -> jax.ShapeDtypeStruct:
    """An abstract array (shape, dtype) for lowering."""
    return jax.ShapeDtypeStruct(shape, dtype)


class StepSettings(NamedTuple):
    """What the compiled pieces of a step depend on besides shapes (learning rate, epochs and schedule are run-time values)."""

    optimizer: str
    batch_size: int
    label_smoothing: float
    augment_crop: int
    augment_flip: bool


def make_optimizer(optimizer: str, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """optax's optimiser with its hyperparameters injected as state (the learning rate is set per step;
    weight decay travels in the state, so every value shares one compiled update)."""
    import functools

    if optimizer == "sgd":
        base = functools.partial(optax.sgd, momentum=0.9, nesterov=True)
    elif optimizer == "adamw":
        base = functools.partial(optax.adamw, weight_decay=weight_decay)
    else:
        base = optax.adam
    return optax.inject_hyperparams(base)(learning_rate=0.0)


def normalise(x: jax.Array, norm: jax.Array) -> jax.Array:
    """uint8 images (..., channels) -> float32, standardised per channel with the training split's mean and std
    (`norm`: (2, channels))."""
    return (x.astype(F32) / 255.0 - norm[0]) / norm[1]


def augment(x: jax.Array, key: jax.Array, crop: int, flip: bool) -> jax.Array:
    """Random crops from the zero-padded images and random horizontal flips; x (batch, height, width, channels) uint8."""
    n, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(key)
    if crop:
        padded = jnp.pad(x, ((0, 0), (crop, crop), (crop, crop), (0, 0)))  # (batch, height + 2 crop, ...)
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * crop + 1)
        cut = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        x = jax.vmap(cut)(padded, offsets)
    if flip:
        mirrored = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        x = jnp.where(mirrored, x[:, :, ::-1], x)
    return x


def batch_at(settings: StepSettings, x_all, y_all, norm, perm, key, epoch, i) -> tuple[jax.Array, jax.Array]:
    """Training batch i of an epoch (shuffled by `perm`, augmented from `key`), normalised."""
    idx = jax.lax.dynamic_slice_in_dim(perm, i * settings.batch_size, settings.batch_size)
    x = x_all[idx]  # (batch, height, width, channels) uint8
    if settings.augment_crop or settings.augment_flip:
        x = augment(x, jax.random.fold_in(jax.random.fold_in(key, epoch), i), settings.augment_crop, settings.augment_flip)
    return normalise(x, norm), y_all[idx]


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against integer labels, optionally label-smoothed."""
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def masked_sums(logits: jax.Array, y: jax.Array, rows: jax.Array) -> jax.Array:
    """[summed loss, correct count] over the rows that belong to the split (eval chunks are padded)."""
    loss = jnp.where(rows, cross_entropy(logits, y), 0.0).sum()
    correct = jnp.where(rows, logits.argmax(-1) == y, False).sum()
    return jnp.stack([loss, correct.astype(F32)])


def conv_module(kind: str, filters: int, kernel: int) -> nn.Conv:
    gene = ConvGene(kind, filters, kernel, "relu")  # the activation is not the convolution's
    return nn.Conv(filters, (kernel, kernel), strides=gene.stride, padding=gene.padding)


def post_apply(activation: str, p: dict, stats: dict, z: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """activation, then BatchNorm (batch statistics when training, running ones otherwise): GenomeCNN's order."""
    bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)
    y, updates = bn.apply({"params": p, "batch_stats": stats}, ACTIVATION_FNS[activation](z), mutable=["batch_stats"])
    return y, updates["batch_stats"]


def conv_shapes(filters: int, kernel: int, c_in: int) -> dict:
    return {"kernel": sds((kernel, kernel, c_in, filters)), "bias": sds((filters,))}


def bn_shapes(f: int) -> tuple[dict, dict]:
    return {"scale": sds((f,)), "bias": sds((f,))}, {"mean": sds((f,)), "var": sds((f,))}


def head_shapes(c: int, classes: int) -> dict:
    from fmnas_jax.genome import HEAD_UNITS

    dense = lambda i, o: {"kernel": sds((i, o)), "bias": sds((o,))}  # noqa: E731
    return {"Dense_0": dense(c, HEAD_UNITS), "Dense_1": dense(HEAD_UNITS, classes)}


def head_logits(activation: str, p: dict, pooled: jax.Array) -> jax.Array:
    from fmnas_jax.genome import HEAD_UNITS

    h = ACTIVATION_FNS[activation](nn.Dense(HEAD_UNITS).apply({"params": p["Dense_0"]}, pooled))
    return nn.Dense(p["Dense_1"]["bias"].shape[0]).apply({"params": p["Dense_1"]}, h)


def moments(optimizer: str) -> optax.GradientTransformation:
    """The optimiser without its learning rate: Adam's moments (adam, adamw) or Nesterov momentum 0.9 (sgd).

    `optax.adam(lr)` is `chain(scale_by_adam(), scale_by_learning_rate(lr))` (adamw adds decayed weights
    between them; sgd is `trace` then the rate): `_update` applies the rest with the rate and the decay as
    run-time scalars, so every value shares one compiled update."""
    return optax.trace(decay=0.9, nesterov=True) if optimizer == "sgd" else optax.scale_by_adam()


WEIGHT_DECAY = "weight_decay"  # the opt_state entry holding adamw's decay (a run-time scalar)


def init_opt_state(params: dict, optimizer: str, weight_decay: float) -> dict:
    """The optimiser's initial state of every module of a params tree, built on the host.

    Every leaf of `scale_by_adam`'s and `trace`'s initial state is zero (count, moments, momentum), so
    zeros of the shapes `eval_shape` gives are that state: `tx.init` itself ran an eager program per new
    parameter shape (~0.1-0.2 s for a new genome's first evaluation in a worker)."""
    tx = moments(optimizer)
    zeros = lambda s: np.zeros(s.shape, s.dtype)  # noqa: E731
    return {m: jax.tree_util.tree_map(zeros, jax.eval_shape(tx.init, p)) for m, p in params.items()} | {
        WEIGHT_DECAY: np.float32(weight_decay)
    }
