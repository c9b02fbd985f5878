"""Several genomes trained as one vmapped program: same-shape groups and masked buckets (opt-in).

A *bucket* is a group of genomes with one layout (NC, RC, NC, RC); each conv layer of the bucket has
the group's largest filter count and kernel size, and every model carries masks that make the big
program compute exactly its own small network:
- kernel: the genome's k x k kernel sits inside the bucket's K x K kernel (zeros around it, kept zero
  by a weight mask), at offset (K-1)//2 - (k-1)//2 for 'same' convs (XLA's SAME padding puts
  (k-1)//2 zeros before) and at 0 for 'valid' stride-2 convs;
- spatial: a 'valid' stride-2 conv's output size depends on k, so the bucket computes the largest
  size the group needs (zero padding at the bottom/right) and a validity mask zeroes the rest; the
  zeros then play the part of the next 'same' conv's padding;
- channels: filters beyond the genome's are zeroed after BatchNorm, whose statistics (and the global
  average pooling) count only valid positions;
- activations: chosen by index (`lax.switch`; under `vmap` a select over the five).
Padded weights get zero gradients, so Adam leaves them at zero; each model keeps its own parameters,
optimiser state and BatchNorm statistics and sees exactly the batches its solo run would see, so
results equal solo training up to float rounding (tests/test_batched.py). Genomes of one shape are the
special case with all-ones masks (a hill climber's neighbourhood is mostly such genomes: 20 of ~32).

On XLA:CPU vmapped convolutions ran 2.5-5x slower than one model after another (docs/benchmarks.md), so CPU
searches do not use this; on a GPU it is unmeasured so far (bench/bench_gpu.sh measures it).
Imports jax/flax/optax/numpy only.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnas_jax.config import check_bucket_limits
from fmnas_jax.data import as_normalisation
from fmnas_jax.genome import ACTIVATIONS, FASHION_MNIST, HEAD_UNITS, ConvGene, Genome, count_params
from fmnas_jax.model import ACTIVATION_FNS, BN_MOMENTUM, init_variables, variable_shapes
from fmnas_jax.train import (
    DeviceData,
    EvalResult,
    StepSettings,
    TrainConfig,
    TrainState,
    batch_at,
    cross_entropy,
    finish,
    fit,
    make_optimizer,
    masked_sums,
    normalise,
    variables_of,
)

# Buckets are written for Fashion-MNIST's shape (backend=buckets refuses other data).
IMAGE_SIZE, NUM_CLASSES = FASHION_MNIST.height, FASHION_MNIST.classes

Bucket = tuple[tuple[str, int, int, int], ...]  # per conv: (type, filters, kernel, smallest kernel in the group)


def train_update(apply: Callable, tx: optax.GradientTransformation, state: TrainState, x, y, lr, smoothing: float = 0.0):
    """One optimiser step of one (masked) model on one batch: (new state, [summed loss, correct count]).

    The reported loss is the plain cross-entropy, whatever the smoothing (as fmnas_jax.programs' head)."""

    def loss_fn(params):
        logits, updates = apply({"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, y, smoothing).mean(), (logits, updates["batch_stats"])

    (_, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sums = jnp.stack([cross_entropy(logits, y).sum(), (logits.argmax(-1) == y).sum().astype(jnp.float32)])
    return TrainState(params, stats, opt_state), sums


def bucket_of(genomes: Sequence[Genome]) -> Bucket:
    """The smallest bucket that holds every genome (they must share one layout)."""
    layouts = {tuple(c.kind for c in g.convs) for g in genomes}
    if len(layouts) != 1:
        raise ValueError(f"a bucket needs genomes of one layout, got {sorted(layouts)}")
    return tuple(
        (layer[0].kind, max(c.filters for c in layer), max(c.kernel for c in layer), min(c.kernel for c in layer))
        for layer in zip(*(g.convs for g in genomes), strict=True)
    )


def bucket_cost(bucket: Bucket) -> int:
    """Forward multiply-adds per image of one model in the bucket (what each model pays when batched)."""
    macs, c_in = 0, 1
    for h, (_, f, k, _) in zip(_sizes(bucket), bucket, strict=True):
        macs += h * h * k * k * c_in * f
        c_in = f
    return macs + c_in * HEAD_UNITS + HEAD_UNITS * NUM_CLASSES


def plan_buckets(genomes: Sequence[Genome], max_models: int = 16, max_waste: float = 2.0) -> list[list[Genome]]:
    """Group a population into buckets: cheapest first, each genome into the first group where the
    bucket's cost for all its models stays within `max_waste` x what they would cost alone."""
    check_bucket_limits(max_models, max_waste)
    own = {g: bucket_cost(bucket_of([g])) for g in genomes}
    groups: list[list[Genome]] = []
    for g in sorted(dict.fromkeys(genomes), key=lambda g: (own[g], str(g))):
        for group in groups:
            cost = bucket_cost(bucket_of([*group, g])) * (len(group) + 1)
            if len(group) < max_models and cost <= max_waste * sum(own[x] for x in (*group, g)):
                group.append(g)
                break
        else:
            groups.append([g])
    return groups


def _sizes(bucket: Bucket) -> list[int]:
    """Spatial output size of each bucket layer: the largest any genome of the group needs."""
    h, out = IMAGE_SIZE, []
    for kind, _, _, k_min in bucket:
        h = h if kind == "NC" else (h - k_min) // 2 + 1
        out.append(h)
    return out


def _offset(kind: str, big: int, k: int) -> int:
    """Where a k x k kernel sits inside the bucket's big x big one."""
    return (big - 1) // 2 - (k - 1) // 2 if kind == "NC" else 0


def _offsets(genome: Genome, bucket: Bucket) -> dict[str, int]:
    return {f"Conv_{i}": _offset(b[0], b[2], c.kernel) for i, (b, c) in enumerate(zip(bucket, genome.convs, strict=True))}


def signature(genome: Genome) -> tuple[tuple[str, int, int], ...]:
    """What fixes the shapes of a genome's arrays: (type, filters, kernel) per conv."""
    return tuple((c.kind, c.filters, c.kernel) for c in genome.convs)


def _act(index: jax.Array, x: jax.Array) -> jax.Array:
    return jax.lax.switch(index, [ACTIVATION_FNS[a] for a in ACTIVATIONS], x)


def masks(genome: Genome, bucket: Bucket) -> dict[str, np.ndarray]:
    """What tells the bucket program which network a model is (host arrays; stacked and vmapped)."""
    out: dict[str, np.ndarray] = {"acts": np.asarray([ACTIVATIONS.index(c.activation) for c in genome.convs]
                                                     + [ACTIVATIONS.index(genome.head_activation)], np.int32)}  # fmt: skip
    if tuple(c.kind for c in genome.convs) != tuple(b[0] for b in bucket):
        raise ValueError(f"genome {genome} does not fit bucket {bucket}: layouts differ")
    solo_sizes = _sizes(bucket_of([genome]))  # a genome alone is its own smallest bucket
    layers = zip(genome.convs, bucket, _sizes(bucket), solo_sizes, strict=True)
    for i, (c, (kind, big_f, big_k, k_min), size, solo) in enumerate(layers):
        if c.filters > big_f or not k_min <= c.kernel <= big_k:
            raise ValueError(f"genome {genome} does not fit bucket {bucket}: layer {i + 1} is {c.filters} filters, kernel {c.kernel}")
        o = _offset(kind, big_k, c.kernel)
        kernel = np.zeros((big_k, big_k, 1, big_f), np.float32)
        kernel[o : o + c.kernel, o : o + c.kernel, :, : c.filters] = 1
        valid = np.zeros((size, size, big_f), np.float32)
        valid[:solo, :solo, : c.filters] = 1
        out[f"kernel_{i}"], out[f"valid_{i}"] = kernel, valid
    out["pool_count"] = np.float32(solo_sizes[-1] ** 2)
    return out


class MaskedCNN(nn.Module):
    """GenomeCNN for any genome of a bucket, told which one by `masks` (same variable names, bigger arrays)."""

    bucket: Bucket

    @nn.compact
    def __call__(self, x: jax.Array, m: dict, train: bool) -> jax.Array:
        h_in = IMAGE_SIZE
        for i, ((kind, filters, big_k, _), h_out) in enumerate(zip(self.bucket, _sizes(self.bucket), strict=True)):
            if kind == "NC":
                stride, lo = 1, (big_k - 1) // 2
                pads = ((lo, big_k - 1 - lo),) * 2
            else:  # 'valid' stride 2, padded at the far side up to the group's largest output
                stride = 2
                pads = ((0, max(0, 2 * (h_out - 1) + big_k - h_in)),) * 2
            weight_mask = jnp.broadcast_to(m[f"kernel_{i}"], (big_k, big_k, x.shape[-1], filters))
            x = nn.Conv(filters, (big_k, big_k), strides=stride, padding=pads, mask=weight_mask, name=f"Conv_{i}")(x)
            x = _act(m["acts"][i], x)
            valid = m[f"valid_{i}"]  # (h, w, filters): the genome's own positions and channels
            # flax's masked BatchNorm: statistics over the valid positions; a padded channel (no valid position) is
            # counted everywhere instead (a constant, so it normalises to its zero bias, not to NaN), then zeroed.
            counted = jnp.logical_or(valid > 0, valid.max(axis=(0, 1)) == 0)
            bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=f"BatchNorm_{i}")
            x = bn(x, mask=jnp.broadcast_to(counted, x.shape)) * valid
            h_in = h_out
        x = x.sum(axis=(1, 2)) / m["pool_count"]  # global average pooling over the valid positions
        x = _act(m["acts"][-1], nn.Dense(HEAD_UNITS, name="Dense_0")(x))
        return nn.Dense(NUM_CLASSES, name="Dense_1")(x)


def _example_masks(bucket: Bucket) -> dict:
    """Masks of the bucket's own largest genome, for shapes (init/eval_shape)."""
    return {k: jnp.asarray(v) for k, v in masks(_widest(bucket), bucket).items()}


def _widest(bucket: Bucket) -> Genome:
    return Genome(tuple(ConvGene(kind, f, k, "relu") for kind, f, k, _ in bucket), "relu")


@functools.lru_cache(maxsize=64)
def _bucket_shapes(bucket: Bucket) -> dict:
    """The bucket model's variables tree as ShapeDtypeStructs (traced once per bucket, never compiled)."""
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1))
    return jax.eval_shape(lambda: MaskedCNN(bucket).init(jax.random.key(0), x, _example_masks(bucket), train=False))


def _at(tree: dict, path: tuple) -> object:
    for p in path:
        tree = tree[p.key]
    return tree


def _region(path: tuple, shape: tuple[int, ...], offsets: dict[str, int]) -> tuple[slice, ...]:
    """Where a genome's variable of `shape` at `path` sits inside the bucket's bigger one: conv kernels
    at their tap offset in the two spatial dims, everything else at the start of every dim."""
    o = offsets.get(path[-2].key, 0) if path[-1].key == "kernel" and len(shape) == 4 else 0
    return tuple(slice(o, o + n) if d < 2 and len(shape) == 4 else slice(0, n) for d, n in enumerate(shape))


def embed_variables(genome: Genome, bucket: Bucket, variables: dict) -> dict:
    """A genome's variables (GenomeCNN tree) placed inside the bucket's arrays; padding is zero
    (BatchNorm scale and running variance: one)."""
    big, offsets = _bucket_shapes(bucket), _offsets(genome, bucket)

    def leaf(path: tuple, small: np.ndarray) -> np.ndarray:
        fill = 1.0 if path[-1].key in ("scale", "var") else 0.0
        out = np.full(_at(big, path).shape, fill, np.float32)
        out[_region(path, small.shape, offsets)] = small
        return out

    return jax.tree_util.tree_map_with_path(leaf, jax.tree_util.tree_map(np.asarray, variables))


def extract_variables(genome: Genome, bucket: Bucket, variables: dict) -> dict:
    """The inverse of `embed_variables`: a genome's own (GenomeCNN) variables out of bucket arrays."""
    offsets = _offsets(genome, bucket)

    def leaf(path: tuple, small: jax.ShapeDtypeStruct) -> np.ndarray:
        return np.asarray(_at(variables, path))[_region(path, small.shape, offsets)]

    return jax.tree_util.tree_map_with_path(leaf, variable_shapes(genome))


def init_bucket_state(genome: Genome, bucket: Bucket, cfg: TrainConfig, seed: int) -> TrainState:
    """The genome's solo initial variables (train.init_state's), embedded, and optax's initial optimiser state."""
    v = embed_variables(genome, bucket, init_variables(genome, seed))
    opt_state = make_optimizer(cfg.optimizer, cfg.weight_decay).init(v["params"])
    return TrainState(v["params"], v["batch_stats"], jax.tree_util.tree_map(np.asarray, opt_state))


@functools.lru_cache(maxsize=64)
def _programs(bucket: Bucket, settings: StepSettings, eval_batch: int) -> tuple:
    """The jitted step and eval chunk of a bucket (jit then caches one executable per model count)."""
    model, tx = MaskedCNN(bucket), make_optimizer(settings.optimizer)

    def one_step(state, m, x, y, lr):
        return train_update(lambda v, x, **kw: model.apply(v, x, m, **kw), tx, state, x, y, lr, settings.label_smoothing)

    def step(state, acc, m, x_all, y_all, norm, perm, key, lr, epoch, i):
        x, y = batch_at(settings, x_all, y_all, norm, perm, key, epoch, i)  # one batch, shared by every model
        state, sums = jax.vmap(one_step, in_axes=(0, 0, None, None, None))(state, m, x, y, lr)
        return state, acc + sums  # acc: (models, 2)

    def one_eval(variables, m, x, y, rows):
        return masked_sums(model.apply(variables, x, m, train=False), y, rows)

    def eval_chunk(variables, acc, m, x_all, y_all, norm, start, stop):
        x = normalise(jax.lax.dynamic_slice_in_dim(x_all, start, eval_batch), norm)
        y = jax.lax.dynamic_slice_in_dim(y_all, start, eval_batch)
        rows = (start + jnp.arange(eval_batch)) < stop
        return acc + jax.vmap(one_eval, in_axes=(0, 0, None, None, None))(variables, m, x, y, rows)

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(eval_chunk)


def _evaluate(eval_chunk, variables, m, dd: DeviceData, rows: tuple[int, int], models: int) -> np.ndarray:
    start, stop = rows
    acc = jnp.zeros((models, 2))
    for s in range(start, stop, dd.eval_batch):
        acc = eval_chunk(variables, acc, m, dd.x_eval, dd.y_eval, dd.norm, s, stop)
    return np.asarray(acc) / (stop - start)  # (models, 2): mean loss, accuracy


def train_batched(
    genomes: Sequence[Genome],
    dd: DeviceData,
    cfg: TrainConfig,
    seed: int,
    bucket: Bucket | None = None,
    keep: bool = False,
    test: bool = True,
) -> list[EvalResult]:
    """Train genomes of one layout together in one masked bucket (default: the smallest that holds
    them); one EvalResult each, as train_and_evaluate would give (`test`: measure test accuracy too).
    `keep` returns each genome's own trained variables (GenomeCNN tree) in `EvalResult.variables`."""
    bucket = bucket or bucket_of(genomes)
    m = len(genomes)
    model_masks = [masks(g, bucket) for g in genomes]  # raises if a genome does not fit
    states = [init_bucket_state(g, bucket, cfg, seed) for g in genomes]
    state = jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack(xs)), *states)  # (models, ...) per leaf
    mk = {k: jnp.asarray(np.stack([mm[k] for mm in model_masks])) for k in model_masks[0]}
    t0 = time.perf_counter()
    step, eval_chunk = _programs(bucket, cfg.step_settings(), dd.eval_batch)
    norm = as_normalisation(np.asarray(dd.norm))
    results = [EvalResult(str(g), "FINISHED", count_params(g), normalisation=norm) for g in genomes]

    def bucket_step(state: TrainState, acc: jax.Array, perm: jax.Array, aug_key: jax.Array, lr: float, epoch: int, i: int) -> tuple:
        return step(state, acc, mk, dd.x_train, dd.y_train, dd.norm, perm, aug_key, lr, epoch, i)

    def evaluate(variables: dict, rows: tuple[int, int]) -> np.ndarray:
        return _evaluate(eval_chunk, variables, mk, dd, rows, m)

    # the solo runs' shuffles and augmentation (train.fit), one batch shared by every model
    state, train_time = fit(bucket_step, evaluate, state, results, dd, cfg, seed, acc_shape=(m, 2))
    final = variables_of(state)
    finish(results, evaluate, final, dd, test)
    elapsed = time.perf_counter() - t0
    images = (dd.n_train // cfg.batch_size) * cfg.batch_size * cfg.epochs * m
    for j, r in enumerate(results):
        r.train_seconds = train_time / m  # the group's time, shared out
        r.compile_seconds = max(elapsed - train_time, 0.0) / m
        r.wall_seconds = elapsed / m
        r.images_per_second = images / max(train_time, 1e-9)
        if keep and r.status == "FINISHED":
            own = jax.tree_util.tree_map(lambda a, j=j: np.asarray(a[j]), final)
            r.variables = extract_variables(genomes[j], bucket, own)
    return results
