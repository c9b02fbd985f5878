"""The compiled pieces a genome's step and eval chunk are made of, each keyed by what it computes, in one cache.

A piece is AOT-compiled once per (key, device) and kept in a bounded cache shared by the threads of a
process, and as an XLA executable in the runtime's pieces folder (fmnas_jax.runtime.pieces_dir), which serves
the next process without tracing the piece again. `raw` gives a piece's function uncompiled, for tracing a whole
step as one program (fmnas_jax.programs.FusedPlan). Imports jax/flax/optax/numpy only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import platform
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import serialize_executable

from fmnas_jax import genome as genome_mod
from fmnas_jax import model as model_mod
from fmnas_jax import ops as ops_mod
from fmnas_jax import runtime
from fmnas_jax.caches import write_atomically
from fmnas_jax.genome import ImageShape, conv_output
from fmnas_jax.ops import (
    F32,
    StepSettings,
    batch_at,
    bn_shapes,
    conv_module,
    conv_shapes,
    cross_entropy,
    head_logits,
    head_shapes,
    masked_sums,
    moments,
    normalise,
    post_apply,
    sds,
)

CACHE_SIZE = 2048  # compiled pieces kept per process (each a few tens of KB of machine code)
log = logging.getLogger("fmnas_jax")


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


class _Piece(NamedTuple):
    """A piece before compilation: the function, the arguments it donates, abstract arguments (ints stay run-time scalars)."""

    fn: Callable
    donate: tuple[int, ...]
    args: tuple

    def compile(self, device: Any, name: str = "piece") -> Any:
        """AOT-compiled for `device`, as the program `name` (XLA's module is named after it, and so is its entry in
        JAX's persistent cache)."""
        placed = [a if isinstance(a, int) else _abstract(device, a) for a in self.args]
        fn = self.fn

        def named(*args: Any) -> Any:
            return fn(*args)

        named.__name__ = named.__qualname__ = name
        return jax.jit(named, donate_argnums=self.donate).lower(*placed).compile()


def _lazy(fn: Callable, donate: tuple[int, ...], *args: Any) -> _Piece:
    return _Piece(fn, donate, args)


def piece(key: tuple, device: Any) -> tuple[Callable, float]:
    """The compiled program for `key` on `device`, and the seconds spent compiling or loading it now (0 if cached)."""
    return CACHE.get((*key, device.platform, device.id), lambda: _compiled(key, device))


# ---------------------------------------------------------------------------
# Compiled pieces kept between processes
# ---------------------------------------------------------------------------
# Tracing and lowering a piece costs ~50 ms on a 2-core CPU, JAX's persistent cache included (it traces to find its
# key): ~3 s for the ~70 pieces of a small search, in every job and every worker process. Loading the executable
# itself takes ~2 ms. A file is named by the piece's key and a fingerprint of everything else that decides its
# machine code, so a change of library, source, XLA flags or CPU compiles afresh into another folder.


@functools.cache
def _fingerprint() -> str:
    """The libraries, this module's and its helpers' source, XLA's flags, x64 and the host CPU, hashed."""
    h = hashlib.sha256()
    for dist in ("jax", "jaxlib", "flax", "optax"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            h.update(f"{dist}={importlib.metadata.version(dist)};".encode())
    for module in (genome_mod, model_mod, ops_mod):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(f"{os.environ.get('XLA_FLAGS', '')};{jax.config.jax_enable_x64};{platform.machine()};".encode())
    with contextlib.suppress(OSError):  # XLA compiles for this CPU's instruction set (Linux names it here)
        h.update(next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "").encode())
    return h.hexdigest()[:16]


def _path(key: tuple, device: Any) -> Path | None:
    folder = runtime.pieces_dir()
    if folder is None:
        return None
    where = f"{device.platform};{device.device_kind};{device.id};{device.client.platform_version}"
    return folder / _fingerprint() / f"{hashlib.sha256(repr((key, where)).encode()).hexdigest()[:32]}.xla"


def _compiled(key: tuple, device: Any) -> Any:
    """The piece `key` compiled for `device`: loaded from the pieces folder, else compiled (and kept there)."""
    path = _path(key, device)
    if path is not None and path.exists():
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())  # our own file: see _keep
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, device.client, [device])
            jax.monitoring.record_event(runtime.PIECE_LOADED)
            return compiled
        except Exception as e:  # a truncated or foreign file: compile afresh and replace it
            log.debug("compiled piece %s unreadable (%s): compiling it again", path, e)
            path.unlink(missing_ok=True)
    hits = runtime.jax_cache_hits_here()
    compiled = _BUILDERS[key[0]](*key[1:]).compile(device, f"fmnas_{key[0]}")
    # Only what XLA compiled here is kept: an executable JAX loaded from its own persistent cache serializes without
    # its machine code on CPU (loaded again, it fails with "Function ... not found"), so such a piece stays JAX's.
    # (Pieces are named fmnas_<kind> so that JAX's entries for them from before this folder existed are not found.)
    if path is not None and runtime.jax_cache_hits_here() == hits:
        _keep(path, compiled)
    return compiled


STALE_DAYS = 30  # a fingerprint's folder nothing was added to for this long goes when another fingerprint starts one


def _keep(path: Path, compiled: Any) -> None:
    """Write the executable atomically (a reader sees a whole file or none); a folder we cannot write is no error."""
    try:
        data = pickle.dumps(serialize_executable.serialize(compiled))
        if not path.parent.is_dir():  # a new fingerprint (another library, source or CPU): old ones' folders go
            path.parent.mkdir(parents=True, exist_ok=True)
            _prune(path.parent)
        write_atomically(path, data)
    except Exception as e:
        log.debug("compiled piece not kept in %s: %s", path, e)


def _prune(current: Path) -> None:
    """Remove the other fingerprints' folders nothing was added to for STALE_DAYS."""
    import shutil

    cutoff = time.time() - STALE_DAYS * 86400
    for folder in current.parent.iterdir():
        with contextlib.suppress(OSError):
            if folder != current and folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)


def raw(key: tuple) -> Callable:
    """The uncompiled function of the piece `key` (to trace inside a bigger program)."""
    return _BUILDERS[key[0]](*key[1:]).fn


def _sample(settings: StepSettings, train_shape: tuple[int, ...]):
    n, norm = train_shape[0], sds((2, train_shape[-1]))  # norm: (2, channels)
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = lambda *a: batch_at(settings, *a)  # noqa: E731
    return _lazy(fn, (), sds(train_shape, jnp.uint8), sds((n,), jnp.int32), norm, sds((n,), jnp.int32), key, 0, 0)


def _eval_sample(eval_shape: tuple[int, ...], batch: int):
    def fn(x_all, y_all, norm, start, stop):
        x = normalise(jax.lax.dynamic_slice_in_dim(x_all, start, batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, batch)
        return x, y, (start + jnp.arange(batch)) < stop  # rows past the split do not count

    return _lazy(fn, (), sds(eval_shape, jnp.uint8), sds(eval_shape[:1], jnp.int32), sds((2, eval_shape[-1])), 0, 0)


def _conv_fwd(kind: str, filters: int, kernel: int, c_in: int, hw: tuple[int, int], batch: int):
    conv, shapes = conv_module(kind, filters, kernel), conv_shapes(filters, kernel, c_in)
    return _lazy(lambda p, x: conv.apply({"params": p}, x), (), shapes, sds((batch, *hw, c_in)))


def _conv_bwd(kind: str, filters: int, kernel: int, c_in: int, hw: tuple[int, int], batch: int, need_dx: bool):
    """Gradients of a convolution from its output's gradient; its forward result is not recomputed (XLA drops it)."""
    conv, out = conv_module(kind, filters, kernel), conv_output(kind, kernel, hw)

    def fn(p, x, dz):
        if need_dx:
            _, vjp = jax.vjp(lambda p, x: conv.apply({"params": p}, x), p, x)
            return vjp(dz)
        _, vjp = jax.vjp(lambda p: conv.apply({"params": p}, x), p)
        return vjp(dz)[0], None

    args = (conv_shapes(filters, kernel, c_in), sds((batch, *hw, c_in)), sds((batch, *out, filters)))
    return _lazy(fn, (), *args)


def _post_fwd(activation: str, f: int, hw: tuple[int, int], batch: int, train: bool):
    p, stats = bn_shapes(f)
    if train:
        fn = lambda p, stats, z: post_apply(activation, p, stats, z, True)  # noqa: E731
        return _lazy(fn, (1,), p, stats, sds((batch, *hw, f)))
    return _lazy(lambda p, stats, z: post_apply(activation, p, stats, z, False)[0], (), p, stats, sds((batch, *hw, f)))


def _post_bwd(activation: str, f: int, hw: tuple[int, int], batch: int):
    """Gradients of activation + BatchNorm, recomputed from the conv output z (cheap: elementwise and reductions)."""

    def fn(p, stats, z, dy):
        _, vjp = jax.vjp(lambda p, z: post_apply(activation, p, stats, z, True)[0], p, z)
        return vjp(dy)

    p, stats = bn_shapes(f)
    return _lazy(fn, (3,), p, stats, sds((batch, *hw, f)), sds((batch, *hw, f)))


def _pool(hw: tuple[int, int], c: int, batch: int):
    return _lazy(lambda y: y.mean(axis=(1, 2)), (), sds((batch, *hw, c)))  # (batch, c)


def _pool_bwd(hw: tuple[int, int], c: int, batch: int):
    fn = lambda d: jnp.broadcast_to(d[:, None, None, :] / (hw[0] * hw[1]), (batch, *hw, c))  # noqa: E731
    return _lazy(fn, (), sds((batch, c)))


def _head(c: int, activation: str, smoothing: float, batch: int, classes: int):
    """Loss, gradients of the head and of its pooled input, and [summed plain loss, correct count] added to `acc`."""

    def fn(p, acc, pooled, y):
        def loss(p, pooled):
            logits = head_logits(activation, p, pooled)
            return cross_entropy(logits, y, smoothing).mean(), logits

        (_, logits), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, pooled)
        sums = jnp.stack([cross_entropy(logits, y).sum(), (logits.argmax(-1) == y).sum().astype(F32)])
        return grads, acc + sums

    return _lazy(fn, (1,), head_shapes(c, classes), sds((2,)), sds((batch, c)), sds((batch,), jnp.int32))


def _head_eval(c: int, activation: str, batch: int, classes: int):
    fn = lambda p, acc, pooled, y, rows: acc + masked_sums(head_logits(activation, p, pooled), y, rows)  # noqa: E731
    args = (head_shapes(c, classes), sds((2,)), sds((batch, c)), sds((batch,), jnp.int32), sds((batch,), jnp.bool_))
    return _lazy(fn, (1,), *args)


def _head_classes(c: int, activation: str, batch: int, classes: int):
    fn = lambda p, pooled: head_logits(activation, p, pooled).argmax(-1)  # noqa: E731
    return _lazy(fn, (), head_shapes(c, classes), sds((batch, c)))


def _normalised(batch: int, image: ImageShape):
    return _lazy(normalise, (), sds((batch, image.height, image.width, image.channels), jnp.uint8), sds((2, image.channels)))


def _update(optimizer: str, shapes: tuple[tuple[str, tuple[int, ...]], ...]):
    """One optimiser step of one module's parameters (e.g. a conv's kernel and bias)."""
    tx, decay = moments(optimizer), optimizer == "adamw"

    def fn(p, g, state, lr, weight_decay):
        u, state = tx.update(g, state, p)
        if decay:
            u = jax.tree_util.tree_map(lambda u, p: u + weight_decay * p, u, p)
        return jax.tree_util.tree_map(lambda p, u: p - lr * u, p, u), state

    params = {n: sds(shape) for n, shape in shapes}
    return _lazy(fn, (0, 2), params, params, jax.eval_shape(tx.init, params), sds(()), sds(()))


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
