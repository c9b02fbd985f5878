"""Checkpoints: a genome's trained variables and input normalisation as msgpack (flax.serialization), never pickle."""

from __future__ import annotations

import jax
import numpy as np
from flax import serialization

from fmnas_jax.genome import ConvGene, Genome
from fmnas_jax.model import variable_shapes

CHECKPOINT_FORMAT = "fmnas_jax.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is not ours, or does not fit its genome."""


def checkpoint_bytes(genome: Genome, variables: dict, normalisation: tuple[float, float]) -> bytes:
    """Serialise trained variables with the genome and the input normalisation they expect."""
    genes = [[c.kind, c.filters, c.kernel, c.activation] for c in genome.convs]
    blob = {
        "format": CHECKPOINT_FORMAT,
        "genome": str(genome),
        "genes": {"convs": {str(i): g for i, g in enumerate(genes)}, "head": genome.head_activation},
        "normalisation": {"mean": float(normalisation[0]), "std": float(normalisation[1])},
        "variables": serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, variables)),
    }
    return serialization.msgpack_serialize(blob)


def read_checkpoint(data: bytes) -> tuple[Genome, dict, tuple[float, float]]:
    """(genome, variables, (mean, std)); CheckpointError if the file is not ours or does not fit its genome."""
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
    expected = variable_shapes(genome)
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
    return genome, variables, (float(norm["mean"]), float(norm["std"]))
