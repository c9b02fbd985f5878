"""A genome's train step and eval chunk, composed of small compiled programs that genomes share.

Why: XLA compiled a genome's fused train step and eval program in ~1.9 s on a 2-core AMD EPYC
(2026-12-01), more than a 4,000-image rung trained, and every genome of a search paid it anew. The
pieces of a step depend on much less than the genome:

- a convolution (forward, and its gradients) on (kind, input channels, filters, kernel, input size);
- the activation + BatchNorm after it on (activation, filters, size);
- global average pooling on (size, channels); the head on (channels, activation, label smoothing);
- the optimiser's update on one parameter's shape (Adam is elementwise, so one update per leaf is
  the same arithmetic as one update of the whole tree);
- drawing the batch on the step settings only.

A climb's neighbours differ in one gene, so most pieces are compiled already: an activation change
compiles two small programs. Measured against the fused step (docs/benchmarks.md): a neighbour compiles
in ~0.3 s instead of ~1.9 s, and the composed step was as fast or faster (the fused step's layouts were
slower for several genomes). Dispatching ~40 programs a step costs ~0.15 ms (~3.5 us each on this CPU).

Each piece is AOT-compiled once per (key, device) and kept in a bounded cache shared by the threads of
a process (JAX's persistent cache serves the next process). Eval chunks have the training batch size,
so they reuse the training convolutions. Imports jax/flax/optax/numpy only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnas_jax.genome import IMAGE_SIZE, IN_CHANNELS, ConvGene, Genome, output_sizes
from fmnas_jax.model import ACTIVATION_FNS, BN_MOMENTUM, variable_shapes

CACHE_SIZE = 2048  # compiled pieces kept per process (each a few tens of KB of machine code)
F32 = jnp.float32


class StepSettings(NamedTuple):
    """What the compiled pieces of a step depend on besides shapes (learning rate, epochs and schedule are run-time values)."""

    optimizer: str
    batch_size: int
    label_smoothing: float
    augment_crop: int
    augment_flip: bool


# ---------------------------------------------------------------------------
# The cache of compiled pieces
# ---------------------------------------------------------------------------


class _Cache:
    """Compiled pieces by key; a piece another thread is compiling is waited for, never compiled twice."""

    def __init__(self, size: int) -> None:
        self.size, self.compiles = size, 0
        self._entries: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], Any]) -> tuple[Any, float]:
        """(compiled piece, seconds this call spent compiling it: 0 when it was cached)."""
        with self._lock:
            entry = self._entries.get(key)
            mine = entry is None
            if mine:
                entry = self._entries[key] = Future()
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        if not mine:
            return entry.result(), 0.0
        t0 = time.perf_counter()
        try:
            entry.set_result(build())
        except BaseException as e:
            with self._lock:
                self._entries.pop(key, None)
            entry.set_exception(e)
            raise
        with self._lock:
            self.compiles += 1
        return entry.result(), time.perf_counter() - t0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = _Cache(CACHE_SIZE)


def _abstract(device: Any, tree: Any) -> Any:
    """ShapeDtypeStructs of `tree` placed on `device` (what AOT lowering needs, without arrays)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(jnp.shape(s), s.dtype, sharding=sharding), tree)


def _spec(shape: tuple[int, ...], dtype: Any = F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


class _Piece(NamedTuple):
    """A piece before compilation: the function, the arguments it donates, abstract arguments (ints stay run-time scalars)."""

    fn: Callable
    donate: tuple[int, ...]
    args: tuple

    def compile(self, device: Any) -> Any:
        """AOT-compiled for `device`."""
        placed = [a if isinstance(a, int) else _abstract(device, a) for a in self.args]
        return jax.jit(self.fn, donate_argnums=self.donate).lower(*placed).compile()


def _lazy(fn: Callable, donate: tuple[int, ...], *args: Any) -> _Piece:
    return _Piece(fn, donate, args)


# ---------------------------------------------------------------------------
# The pieces (pure functions; each builder returns an AOT-compiled program)
# ---------------------------------------------------------------------------


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
    """uint8 images -> float32, standardised with the training split's mean and std."""
    return (x.astype(F32) / 255.0 - norm[0]) / norm[1]


def augment(x: jax.Array, key: jax.Array, crop: int, flip: bool) -> jax.Array:
    """Random crops from the zero-padded images and random horizontal flips; x (batch, 28, 28, 1) uint8."""
    n = x.shape[0]
    k_crop, k_flip = jax.random.split(key)
    if crop:
        padded = jnp.pad(x, ((0, 0), (crop, crop), (crop, crop), (0, 0)))  # (batch, 28 + 2 crop, ..., 1)
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * crop + 1)
        cut = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (IMAGE_SIZE, IMAGE_SIZE, 1))  # noqa: E731
        x = jax.vmap(cut)(padded, offsets)
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


def _conv(kind: str, filters: int, kernel: int) -> nn.Conv:
    gene = ConvGene(kind, filters, kernel, "relu")  # the activation is not the convolution's
    return nn.Conv(filters, (kernel, kernel), strides=gene.stride, padding=gene.padding)


def _post(activation: str, p: dict, stats: dict, z: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """activation, then BatchNorm (batch statistics when training, running ones otherwise): GenomeCNN's order."""
    bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)
    y, updates = bn.apply({"params": p, "batch_stats": stats}, ACTIVATION_FNS[activation](z), mutable=["batch_stats"])
    return y, updates["batch_stats"]


def _conv_shapes(filters: int, kernel: int, c_in: int) -> dict:
    return {"kernel": _spec((kernel, kernel, c_in, filters)), "bias": _spec((filters,))}


def _bn_shapes(f: int) -> tuple[dict, dict]:
    return {"scale": _spec((f,)), "bias": _spec((f,))}, {"mean": _spec((f,)), "var": _spec((f,))}


def _head_shapes(c: int) -> dict:
    from fmnas_jax.genome import HEAD_UNITS, NUM_CLASSES

    dense = lambda i, o: {"kernel": _spec((i, o)), "bias": _spec((o,))}  # noqa: E731
    return {"Dense_0": dense(c, HEAD_UNITS), "Dense_1": dense(HEAD_UNITS, NUM_CLASSES)}


def _head_logits(activation: str, p: dict, pooled: jax.Array) -> jax.Array:
    from fmnas_jax.genome import HEAD_UNITS, NUM_CLASSES

    h = ACTIVATION_FNS[activation](nn.Dense(HEAD_UNITS).apply({"params": p["Dense_0"]}, pooled))
    return nn.Dense(NUM_CLASSES).apply({"params": p["Dense_1"]}, h)


def piece(key: tuple, device: Any) -> tuple[Callable, float]:
    """The compiled program for `key` on `device`, and the seconds spent compiling it now (0 if cached)."""
    return CACHE.get((*key, device.platform, device.id), lambda: _BUILDERS[key[0]](*key[1:]).compile(device))


def raw(key: tuple) -> Callable:
    """The uncompiled function of the piece `key` (to trace inside a bigger program)."""
    return _BUILDERS[key[0]](*key[1:]).fn


def _sample(settings: StepSettings, train_shape: tuple[int, ...]):
    n, vec = train_shape[0], _spec((2,))
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = lambda *a: batch_at(settings, *a)  # noqa: E731
    return _lazy(fn, (), _spec(train_shape, jnp.uint8), _spec((n,), jnp.int32), vec, _spec((n,), jnp.int32), key, 0, 0)


def _eval_sample(eval_shape: tuple[int, ...], batch: int):
    def fn(x_all, y_all, norm, start, stop):
        x = normalise(jax.lax.dynamic_slice_in_dim(x_all, start, batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, batch)
        return x, y, (start + jnp.arange(batch)) < stop  # rows past the split do not count

    return _lazy(fn, (), _spec(eval_shape, jnp.uint8), _spec(eval_shape[:1], jnp.int32), _spec((2,)), 0, 0)


def _conv_fwd(kind: str, filters: int, kernel: int, c_in: int, size: int, batch: int):
    conv, shapes = _conv(kind, filters, kernel), _conv_shapes(filters, kernel, c_in)
    return _lazy(lambda p, x: conv.apply({"params": p}, x), (), shapes, _spec((batch, size, size, c_in)))


def _conv_bwd(kind: str, filters: int, kernel: int, c_in: int, size: int, batch: int, need_dx: bool):
    """Gradients of a convolution from its output's gradient; its forward result is not recomputed (XLA drops it)."""
    conv, out = _conv(kind, filters, kernel), output_sizes(Genome((ConvGene(kind, filters, kernel, "relu"),), "relu"), size)[0]

    def fn(p, x, dz):
        if need_dx:
            _, vjp = jax.vjp(lambda p, x: conv.apply({"params": p}, x), p, x)
            return vjp(dz)
        _, vjp = jax.vjp(lambda p: conv.apply({"params": p}, x), p)
        return vjp(dz)[0], None

    args = (_conv_shapes(filters, kernel, c_in), _spec((batch, size, size, c_in)), _spec((batch, out, out, filters)))
    return _lazy(fn, (), *args)


def _post_fwd(activation: str, f: int, size: int, batch: int, train: bool):
    p, stats = _bn_shapes(f)
    if train:
        fn = lambda p, stats, z: _post(activation, p, stats, z, True)  # noqa: E731
        return _lazy(fn, (1,), p, stats, _spec((batch, size, size, f)))
    return _lazy(lambda p, stats, z: _post(activation, p, stats, z, False)[0], (), p, stats, _spec((batch, size, size, f)))


def _post_bwd(activation: str, f: int, size: int, batch: int):
    """Gradients of activation + BatchNorm, recomputed from the conv output z (cheap: elementwise and reductions)."""

    def fn(p, stats, z, dy):
        _, vjp = jax.vjp(lambda p, z: _post(activation, p, stats, z, True)[0], p, z)
        return vjp(dy)

    p, stats = _bn_shapes(f)
    return _lazy(fn, (3,), p, stats, _spec((batch, size, size, f)), _spec((batch, size, size, f)))


def _pool(size: int, c: int, batch: int):
    return _lazy(lambda y: y.mean(axis=(1, 2)), (), _spec((batch, size, size, c)))  # (batch, c)


def _pool_bwd(size: int, c: int, batch: int):
    fn = lambda d: jnp.broadcast_to(d[:, None, None, :] / (size * size), (batch, size, size, c))  # noqa: E731
    return _lazy(fn, (), _spec((batch, c)))


def _head(c: int, activation: str, smoothing: float, batch: int):
    """Loss, gradients of the head and of its pooled input, and [summed plain loss, correct count] added to `acc`."""

    def fn(p, acc, pooled, y):
        def loss(p, pooled):
            logits = _head_logits(activation, p, pooled)
            return cross_entropy(logits, y, smoothing).mean(), logits

        (_, logits), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, pooled)
        sums = jnp.stack([cross_entropy(logits, y).sum(), (logits.argmax(-1) == y).sum().astype(F32)])
        return grads, acc + sums

    return _lazy(fn, (1,), _head_shapes(c), _spec((2,)), _spec((batch, c)), _spec((batch,), jnp.int32))


def _head_eval(c: int, activation: str, batch: int):
    fn = lambda p, acc, pooled, y, rows: acc + masked_sums(_head_logits(activation, p, pooled), y, rows)  # noqa: E731
    args = (_head_shapes(c), _spec((2,)), _spec((batch, c)), _spec((batch,), jnp.int32), _spec((batch,), jnp.bool_))
    return _lazy(fn, (1,), *args)


def _head_classes(c: int, activation: str, batch: int):
    fn = lambda p, pooled: _head_logits(activation, p, pooled).argmax(-1)  # noqa: E731
    return _lazy(fn, (), _head_shapes(c), _spec((batch, c)))


def _normalised(batch: int):
    return _lazy(normalise, (), _spec((batch, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.uint8), _spec((2,)))


def moments(optimizer: str) -> optax.GradientTransformation:
    """The optimiser without its learning rate: Adam's moments (adam, adamw) or Nesterov momentum 0.9 (sgd).

    `optax.adam(lr)` is `chain(scale_by_adam(), scale_by_learning_rate(lr))` (adamw adds decayed weights
    between them; sgd is `trace` then the rate): `_update` applies the rest with the rate and the decay as
    run-time scalars, so every value shares one compiled update."""
    return optax.trace(decay=0.9, nesterov=True) if optimizer == "sgd" else optax.scale_by_adam()


def _update(optimizer: str, shapes: tuple[tuple[str, tuple[int, ...]], ...]):
    """One optimiser step of one module's parameters (e.g. a conv's kernel and bias)."""
    tx, decay = moments(optimizer), optimizer == "adamw"

    def fn(p, g, state, lr, weight_decay):
        u, state = tx.update(g, state, p)
        if decay:
            u = jax.tree_util.tree_map(lambda u, p: u + weight_decay * p, u, p)
        return jax.tree_util.tree_map(lambda p, u: p - lr * u, p, u), state

    params = {n: _spec(shape) for n, shape in shapes}
    return _lazy(fn, (0, 2), params, params, jax.eval_shape(tx.init, params), _spec(()), _spec(()))


_BUILDERS: dict[str, Callable] = {
    "sample": _sample,
    "eval_sample": _eval_sample,
    "conv": _conv_fwd,
    "conv_bwd": _conv_bwd,
    "post": _post_fwd,
    "post_bwd": _post_bwd,
    "pool": _pool,
    "pool_bwd": _pool_bwd,
    "head": _head,
    "head_eval": _head_eval,
    "head_classes": _head_classes,
    "normalised": _normalised,
    "update": _update,
}


# ---------------------------------------------------------------------------
# A genome's plan: which pieces, in which order
# ---------------------------------------------------------------------------


WEIGHT_DECAY = "weight_decay"  # the opt_state entry holding adamw's decay (a run-time scalar)


class TrainState(NamedTuple):
    """Flax's variables (`params`, `batch_stats`) and the optimiser's state per module ('Conv_0' -> state),
    plus its weight decay under WEIGHT_DECAY."""

    params: Any
    batch_stats: Any
    opt_state: Any


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


class _Pieces:
    """Compiled pieces looked up by key, with the seconds the lookups spent compiling."""

    def __init__(self, device: Any) -> None:
        self.device, self.compile_seconds = device, 0.0

    def get(self, key: tuple) -> Callable:
        program, seconds = piece(key, self.device)
        self.compile_seconds += seconds
        return program


class _Raw(_Pieces):
    """The pieces' functions uncompiled, to trace a whole step or eval chunk as one program (`fused`)."""

    def get(self, key: tuple) -> Callable:
        return raw(key)


class EvalPlan:
    """The pieces that score or classify one genome's trained variables, `chunk` images at a time."""

    def __init__(self, genome: Genome, chunk: int, device: Any, pieces: _Pieces | None = None) -> None:
        self.pieces = pieces or _Pieces(device)
        self.chunk, self.genome, self.device = chunk, genome, device
        get = self.pieces.get
        self._layers, c, size = [], IN_CHANNELS, IMAGE_SIZE
        for i, (gene, out) in enumerate(zip(genome.convs, output_sizes(genome), strict=True)):
            conv = get(("conv", gene.kind, gene.filters, gene.kernel, c, size, chunk))
            self._layers.append((i, conv, get(("post", gene.activation, gene.filters, out, chunk, False))))
            c, size = gene.filters, out
        self._pool = get(("pool", size, c, chunk))
        self._head_key = (c, genome.head_activation, chunk)

    @property
    def compile_seconds(self) -> float:
        return self.pieces.compile_seconds

    def _pooled(self, variables: dict, x: jax.Array) -> jax.Array:
        params, stats = variables["params"], variables["batch_stats"]
        for i, conv, post in self._layers:
            x = post(params[f"BatchNorm_{i}"], stats[f"BatchNorm_{i}"], conv(params[f"Conv_{i}"], x))
        return self._pool(x)

    def eval_chunk(self, variables: dict, acc, x_all, y_all, norm, start: int, stop: int) -> jax.Array:
        """`acc` + [summed loss, correct count] over eval rows [start, min(start + chunk, stop))."""
        x, y, rows = self.pieces.get(("eval_sample", tuple(x_all.shape), self.chunk))(x_all, y_all, norm, start, stop)
        head = {"Dense_0": variables["params"]["Dense_0"], "Dense_1": variables["params"]["Dense_1"]}
        return self.pieces.get(("head_eval", *self._head_key))(head, acc, self._pooled(variables, x), y, rows)

    def classes(self, variables: dict, images: jax.Array, norm: jax.Array) -> jax.Array:
        """Class ids (chunk,) of uint8 images (chunk, 28, 28, 1) on the 0..255 scale."""
        x = self.pieces.get(("normalised", self.chunk))(images, norm)
        head = {"Dense_0": variables["params"]["Dense_0"], "Dense_1": variables["params"]["Dense_1"]}
        return self.pieces.get(("head_classes", *self._head_key))(head, self._pooled(variables, x))


class _Layer(NamedTuple):
    name: int
    conv: Callable
    conv_bwd: Callable
    post: Callable
    post_bwd: Callable


class Plan:
    """The compiled pieces one genome's training uses, `step` over them, and its `EvalPlan`."""

    def __init__(self, genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], eval_shape: tuple[int, ...], chunk: int,
                 device: Any, pieces: _Pieces | None = None) -> None:  # fmt: skip
        self.pieces = pieces or _Pieces(device)
        get, b = self.pieces.get, settings.batch_size
        self._sample = get(("sample", settings, train_shape))
        self._layers: list[_Layer] = []
        c, size = IN_CHANNELS, IMAGE_SIZE
        for i, (gene, out) in enumerate(zip(genome.convs, output_sizes(genome), strict=True)):
            f, act = gene.filters, gene.activation
            conv = (gene.kind, f, gene.kernel, c, size, b)
            keys = [("conv", *conv), ("conv_bwd", *conv, i > 0), ("post", act, f, out, b, True), ("post_bwd", act, f, out, b)]
            self._layers.append(_Layer(i, *(get(k) for k in keys)))
            c, size = f, out
        self._pool, self._pool_bwd = get(("pool", size, c, b)), get(("pool_bwd", size, c, b))
        self._head = get(("head", c, genome.head_activation, settings.label_smoothing, b))
        shapes = variable_shapes(genome)["params"]
        self._updates = {m: get(("update", settings.optimizer, tuple((n, tuple(v.shape)) for n, v in sorted(shapes[m].items()))))
                         for m in shapes}  # fmt: skip
        self.eval = EvalPlan(genome, chunk, device, self.pieces)
        self.eval.pieces.get(("eval_sample", eval_shape, chunk))
        self.eval.pieces.get(("head_eval", *self.eval._head_key))

    @property
    def compile_seconds(self) -> float:
        return self.pieces.compile_seconds

    def _apply(self, params: dict, opt: dict, module: str, grads: dict, lr: Any) -> None:
        """Update one module's parameters in the dicts `params` and `opt` (the old buffers are donated)."""
        params[module], opt[module] = self._updates[module](params[module], grads, opt[module], lr, opt[WEIGHT_DECAY])

    def step(self, state: TrainState, acc, x_all, y_all, norm, perm, key, lr, epoch: int, i: int) -> tuple[TrainState, jax.Array]:
        """One optimiser step on batch i of an epoch; returns the new state and `acc` + [summed loss, correct count]."""
        x, y = self._sample(x_all, y_all, norm, perm, key, epoch, i)
        params, stats, opt = dict(state.params), dict(state.batch_stats), dict(state.opt_state)
        inputs, outputs = [], []
        # FORWARD: each layer's input and conv output are kept for its gradients.
        for layer in self._layers:
            bn = f"BatchNorm_{layer.name}"
            inputs.append(x)
            outputs.append(layer.conv(params[f"Conv_{layer.name}"], x))
            x, stats[bn] = layer.post(params[bn], stats[bn], outputs[-1])
        head = {"Dense_0": params["Dense_0"], "Dense_1": params["Dense_1"]}
        (d_head, d_pooled), acc = self._head(head, acc, self._pool(x), y)
        # BACKWARD: a layer's parameters are updated as soon as its gradients are known (the layers below need only dy).
        for module in ("Dense_0", "Dense_1"):
            self._apply(params, opt, module, d_head[module], lr)
        dy = self._pool_bwd(d_pooled)
        for layer in reversed(self._layers):
            bn, conv = f"BatchNorm_{layer.name}", f"Conv_{layer.name}"
            d_bn, dz = layer.post_bwd(params[bn], stats[bn], outputs[layer.name], dy)
            d_conv, dy = layer.conv_bwd(params[conv], inputs[layer.name], dz)
            self._apply(params, opt, bn, d_bn, lr)
            self._apply(params, opt, conv, d_conv, lr)
        return TrainState(params, stats, opt), acc


# ---------------------------------------------------------------------------
# The same plan as one program per step (XLA sees the whole step)
# ---------------------------------------------------------------------------


def _abstract_state(genome: Genome, optimizer: str) -> TrainState:
    v = variable_shapes(genome)
    opt = init_opt_state(v["params"], optimizer, 0.0)
    return TrainState(v["params"], v["batch_stats"], jax.tree_util.tree_map(lambda a: _spec(np.shape(a), np.asarray(a).dtype), opt))


def _fused_step(genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], eval_shape: tuple[int, ...], chunk: int) -> _Piece:
    plan = Plan(genome, settings, train_shape, eval_shape, chunk, None, _Raw(None))
    n, vec = train_shape[0], _spec((2,))
    key = jax.eval_shape(lambda: jax.random.key(0))
    arrays = (_spec(train_shape, jnp.uint8), _spec((n,), jnp.int32), vec, _spec((n,), jnp.int32), key, _spec(()))
    return _lazy(plan.step, (0, 1), _abstract_state(genome, settings.optimizer), vec, *arrays, 0, 0)


def _fused_eval(genome: Genome, eval_shape: tuple[int, ...], chunk: int) -> _Piece:
    plan = EvalPlan(genome, chunk, None, _Raw(None))
    v = variable_shapes(genome)
    variables = {"params": v["params"], "batch_stats": v["batch_stats"]}
    return _lazy(plan.eval_chunk, (1,), variables, _spec((2,)), _spec(eval_shape, jnp.uint8), _spec(eval_shape[:1], jnp.int32),
                 _spec((2,)), 0, 0)  # fmt: skip


_BUILDERS |= {"fused_step": _fused_step, "fused_eval": _fused_eval}


class FusedPlan:
    """A genome's Plan traced whole: one compiled program per step and one per eval chunk (compiled per genome).

    For a process that gives XLA several threads (an in-process run, the final retrain): a fused step let
    XLA:CPU overlap and fuse across pieces, 8,533 against 6,347 images/s for the paper's genome on 2 threads
    of a 2-core AMD EPYC (docs/benchmarks.md), while single-threaded workers ran both about equally fast."""

    def __init__(self, genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], eval_shape: tuple[int, ...], chunk: int,
                 device: Any) -> None:  # fmt: skip
        self.pieces = _Pieces(device)
        self.step = self.pieces.get(("fused_step", genome, settings, train_shape, eval_shape, chunk))
        self.eval = _FusedEval(self.pieces.get(("fused_eval", genome, eval_shape, chunk)), chunk)

    @property
    def compile_seconds(self) -> float:
        return self.pieces.compile_seconds


class _FusedEval(NamedTuple):
    eval_chunk: Callable
    chunk: int
