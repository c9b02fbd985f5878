"""Checkpoints: a genome's trained variables and input normalisation as msgpack (flax.serialization), never pickle."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import serialization

from fmnas_jax.data import CLASS_NAMES as FASHION_MNIST_CLASSES
from fmnas_jax.data import Normalisation, as_normalisation
from fmnas_jax.genome import FASHION_MNIST, ConvGene, Genome, ImageShape
from fmnas_jax.model import variable_shapes

CHECKPOINT_FORMAT = "fmnas_jax.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is not ours, or does not fit its genome."""


class Checkpoint(NamedTuple):
    genome: Genome
    variables: dict
    normalisation: Normalisation  # (mean, std) per channel
    image: ImageShape  # the data it was trained on: image shape and number of classes
    class_names: tuple[str, ...]


def checkpoint_bytes(genome: Genome, variables: dict, normalisation: Normalisation, image: ImageShape = FASHION_MNIST,
                     class_names: tuple[str, ...] = FASHION_MNIST_CLASSES) -> bytes:  # fmt: skip
    """Serialise trained variables with the genome, the input normalisation they expect and the data's shape and classes."""
    genes = [[c.kind, c.filters, c.kernel, c.activation] for c in genome.convs]
    blob = {
        "format": CHECKPOINT_FORMAT,
        "genome": str(genome),
        "genes": {"convs": {str(i): g for i, g in enumerate(genes)}, "head": genome.head_activation},
        "normalisation": {"mean": np.asarray(normalisation[0], np.float64), "std": np.asarray(normalisation[1], np.float64)},  # per channel
        "data": {
            "height": image.height,
            "width": image.width,
            "channels": image.channels,
            "classes": {str(i): n for i, n in enumerate(class_names)},
        },
        "variables": serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, variables)),
    }
    return serialization.msgpack_serialize(blob)


def read_checkpoint(data: bytes) -> Checkpoint:
    """The checkpoint's contents; CheckpointError if the file is not ours or does not fit its genome.
    One written before other data existed is Fashion-MNIST's."""
    try:
        blob = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types on garbage
        raise CheckpointError(f"not a fmnas_jax checkpoint (msgpack could not read it: {type(e).__name__})") from e
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a fmnas_jax checkpoint: format {blob.get('format') if isinstance(blob, dict) else None!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")  # fmt: skip
    convs = blob["genes"]["convs"]
    genome = Genome(
        tuple(ConvGene(str(k), int(f), int(s), str(a)) for k, f, s, a in (convs[str(i)] for i in range(len(convs)))),
        str(blob["genes"]["head"]),
    )
    if str(genome) != blob["genome"]:
        raise CheckpointError(f"checkpoint genes {genome} disagree with its genome string {blob['genome']!r}")
    shape = blob.get("data") or {
        "height": 28,
        "width": 28,
        "channels": 1,
        "classes": {str(i): n for i, n in enumerate(FASHION_MNIST_CLASSES)},
    }
    class_names = tuple(str(shape["classes"][str(i)]) for i in range(len(shape["classes"])))
    image = ImageShape(int(shape["height"]), int(shape["width"]), int(shape["channels"]), len(class_names))
    expected = variable_shapes(genome, image)
    flat_exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    try:
        variables = serialization.from_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), expected), blob["variables"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint variables do not match genome {genome}: {e}") from e
    bad = [
        f"{jax.tree_util.keystr(p)}: {tuple(np.shape(v))} != {flat_exp[p].shape}"
        for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
        if tuple(np.shape(v)) != tuple(flat_exp[p].shape)
    ]
    if bad:
        raise CheckpointError(f"checkpoint shapes do not match genome {genome}: " + "; ".join(bad[:5]))
    norm = blob["normalisation"]
    return Checkpoint(genome, variables, as_normalisation((norm["mean"], norm["std"])), image, class_names)
