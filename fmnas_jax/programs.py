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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax.genome import FASHION_MNIST, Genome, ImageShape, output_shapes
from fmnas_jax.model import variable_shapes
from fmnas_jax.ops import WEIGHT_DECAY, StepSettings, init_opt_state, sds
from fmnas_jax.pieces import _BUILDERS, _lazy, _Piece, piece, raw

# ---------------------------------------------------------------------------
# A genome's plan: which pieces, in which order
# ---------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Flax's variables (`params`, `batch_stats`) and the optimiser's state per module ('Conv_0' -> state),
    plus its weight decay under WEIGHT_DECAY."""

    params: Any
    batch_stats: Any
    opt_state: Any


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

    def __init__(self, genome: Genome, chunk: int, device: Any, pieces: _Pieces | None = None, image: ImageShape = FASHION_MNIST) -> None:
        self.pieces = pieces or _Pieces(device)
        self.chunk, self.genome, self.device, self.image = chunk, genome, device, image
        get = self.pieces.get
        self._layers, c, hw = [], image.channels, image.hw
        for i, (gene, out) in enumerate(zip(genome.convs, output_shapes(genome, image), strict=True)):
            conv = get(("conv", gene.kind, gene.filters, gene.kernel, c, hw, chunk))
            self._layers.append((i, conv, get(("post", gene.activation, gene.filters, out, chunk, False))))
            c, hw = gene.filters, out
        self._pool = get(("pool", hw, c, chunk))
        self._head_key = (c, genome.head_activation, chunk, image.classes)

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
        """Class ids (chunk,) of uint8 images (chunk, height, width, channels) on the 0..255 scale."""
        x = self.pieces.get(("normalised", self.chunk, self.image))(images, norm)
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
                 device: Any, pieces: _Pieces | None = None, classes: int = 10) -> None:  # fmt: skip
        self.pieces = pieces or _Pieces(device)
        get, b = self.pieces.get, settings.batch_size
        image = ImageShape(*train_shape[1:], classes)
        self._sample = get(("sample", settings, train_shape))
        self._layers: list[_Layer] = []
        c, hw = image.channels, image.hw
        for i, (gene, out) in enumerate(zip(genome.convs, output_shapes(genome, image), strict=True)):
            f, act = gene.filters, gene.activation
            conv = (gene.kind, f, gene.kernel, c, hw, b)
            keys = [("conv", *conv), ("conv_bwd", *conv, i > 0), ("post", act, f, out, b, True), ("post_bwd", act, f, out, b)]
            self._layers.append(_Layer(i, *(get(k) for k in keys)))
            c, hw = f, out
        self._pool, self._pool_bwd = get(("pool", hw, c, b)), get(("pool_bwd", hw, c, b))
        self._head = get(("head", c, genome.head_activation, settings.label_smoothing, b, classes))
        shapes = variable_shapes(genome, image)["params"]
        self._updates = {m: get(("update", settings.optimizer, tuple((n, tuple(v.shape)) for n, v in sorted(shapes[m].items()))))
                         for m in shapes}  # fmt: skip
        self.eval = EvalPlan(genome, chunk, device, self.pieces, image)
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


def _abstract_state(genome: Genome, optimizer: str, image: ImageShape) -> TrainState:
    v = variable_shapes(genome, image)
    opt = init_opt_state(v["params"], optimizer, 0.0)
    return TrainState(v["params"], v["batch_stats"], jax.tree_util.tree_map(lambda a: sds(np.shape(a), np.asarray(a).dtype), opt))


def _fused_step(genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], eval_shape: tuple[int, ...], chunk: int,
                classes: int) -> _Piece:  # fmt: skip
    plan = Plan(genome, settings, train_shape, eval_shape, chunk, None, _Raw(None), classes)
    n, acc, norm = train_shape[0], sds((2,)), sds((2, train_shape[-1]))  # acc: (loss, correct) sums; norm: (2, channels)
    key = jax.eval_shape(lambda: jax.random.key(0))
    arrays = (sds(train_shape, jnp.uint8), sds((n,), jnp.int32), norm, sds((n,), jnp.int32), key, sds(()))
    return _lazy(plan.step, (0, 1), _abstract_state(genome, settings.optimizer, ImageShape(*train_shape[1:], classes)), acc, *arrays, 0, 0)


def _fused_eval(genome: Genome, eval_shape: tuple[int, ...], chunk: int, classes: int) -> _Piece:
    image = ImageShape(*eval_shape[1:], classes)
    plan = EvalPlan(genome, chunk, None, _Raw(None), image)
    v = variable_shapes(genome, image)
    variables = {"params": v["params"], "batch_stats": v["batch_stats"]}
    return _lazy(plan.eval_chunk, (1,), variables, sds((2,)), sds(eval_shape, jnp.uint8), sds(eval_shape[:1], jnp.int32),
                 sds((2, eval_shape[-1])), 0, 0)  # fmt: skip


_BUILDERS |= {"fused_step": _fused_step, "fused_eval": _fused_eval}


class FusedPlan:
    """A genome's Plan traced whole: one compiled program per step and one per eval chunk (compiled per genome).

    For a process that gives XLA several threads (an in-process run, the final retrain): a fused step let
    XLA:CPU overlap and fuse across pieces, 8,533 against 6,347 images/s for the paper's genome on 2 threads
    of a 2-core AMD EPYC (docs/benchmarks.md), while single-threaded workers ran both about equally fast."""

    def __init__(self, genome: Genome, settings: StepSettings, train_shape: tuple[int, ...], eval_shape: tuple[int, ...], chunk: int,
                 device: Any, classes: int = 10) -> None:  # fmt: skip
        self.pieces = _Pieces(device)
        self.step = self.pieces.get(("fused_step", genome, settings, train_shape, eval_shape, chunk, classes))
        self.eval = _FusedEval(self.pieces.get(("fused_eval", genome, eval_shape, chunk, classes)), chunk)

    @property
    def compile_seconds(self) -> float:
        return self.pieces.compile_seconds


class _FusedEval(NamedTuple):
    eval_chunk: Callable
    chunk: int
