"""The Flax model a genome describes: [Conv -> activation -> BatchNorm] x 4, then the FL head."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmnas_jax.genome import HEAD_UNITS, NUM_CLASSES, Genome

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
    """CNN for (batch, 28, 28, 1) inputs, returning (batch, 10) logits."""

    genome: Genome

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for gene in self.genome.convs:
            x = nn.Conv(gene.filters, (gene.kernel, gene.kernel), strides=gene.stride, padding=gene.padding)(x)
            x = ACTIVATION_FNS[gene.activation](x)
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
        x = x.mean(axis=(1, 2))  # global average pooling: (batch, channels)
        x = ACTIVATION_FNS[self.genome.head_activation](nn.Dense(HEAD_UNITS)(x))
        return nn.Dense(NUM_CLASSES)(x)


def init_variables(genome: Genome, key: jax.Array) -> dict:
    """{'params': ..., 'batch_stats': ...} for `genome`."""
    return GenomeCNN(genome).init(key, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)


def variable_count(variables: dict) -> int:
    """Number of scalars in a variables tree (params and BatchNorm statistics)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))
