"""The Flax model a genome describes: [Conv -> activation -> BatchNorm] x 4, then the FL head."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax.genome import FASHION_MNIST, HEAD_UNITS, Genome, ImageShape

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "swish": nn.swish,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # Keras' default (erf) form
}
# PyTorch-style 0.1 update (0.9 here): short searches take only a few hundred steps, and
# Flax's default 0.99 leaves the running statistics far from the data after so few.
BN_MOMENTUM = 0.9


class GenomeCNN(nn.Module):
    """CNN for (batch, height, width, channels) inputs, returning (batch, classes) logits."""

    genome: Genome
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for gene in self.genome.convs:
            x = nn.Conv(gene.filters, (gene.kernel, gene.kernel), strides=gene.stride, padding=gene.padding)(x)
            x = ACTIVATION_FNS[gene.activation](x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
        x = x.mean(axis=(1, 2))  # global average pooling: (batch, channels)
        x = ACTIVATION_FNS[self.genome.head_activation](nn.Dense(HEAD_UNITS)(x))
        return nn.Dense(self.classes)(x)


@functools.lru_cache(maxsize=256)
def variable_shapes(genome: Genome, image: ImageShape = FASHION_MNIST) -> dict:
    """The variables tree as ShapeDtypeStructs (traced once, never compiled)."""
    x = jnp.zeros((1, image.height, image.width, image.channels), jnp.float32)
    return jax.eval_shape(lambda: GenomeCNN(genome, image.classes).init(jax.random.key(0), x, train=False))


def init_variables(genome: Genome, seed: int, image: ImageShape = FASHION_MNIST) -> dict:
    """Flax's default initialisation, drawn with NumPy: lecun-normal (truncated) kernels, zero biases,
    BatchNorm scale/var 1 and bias/mean 0.

    NumPy rather than `module.init`: the latter compiles an XLA program per genome (about 1 s on
    CPU, or ~3 s when run eagerly), which was a third of a small evaluation's time.
    """
    rng = np.random.default_rng([seed, 0x1A17])

    def leaf(path: tuple, shape: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(shape.shape[:-1]))
            z = rng.standard_normal(shape.shape)
            while (bad := np.abs(z) > 2).any():  # truncate at 2 sigma, as jax.nn.initializers.truncated_normal
                z[bad] = rng.standard_normal(int(bad.sum()))
            return (z * np.sqrt(1.0 / fan_in) / 0.87962566103423978).astype(np.float32)
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(shape.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, variable_shapes(genome, image))


def variable_count(variables: dict) -> int:
    """Number of scalars in a variables tree (params and BatchNorm statistics)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))
