"""The batched paths (same-shape vmap and masked buckets) compute what training each genome alone computes."""

import jax
import numpy as np
import pytest

from fmnas_jax import Genome, SearchSpace
from fmnas_jax.batched import bucket_cost, bucket_of, embed_variables, extract_variables, masks, plan_buckets, signature, train_batched
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.genome import sample_population
from fmnas_jax.model import init_variables
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

BASE = "NC 8 3 {a};RC 16 3 {b};NC 8 3 {c};RC 16 3 relu;FL {d};"
SAME_SHAPE = [Genome.parse(BASE.format(a=a, b=b, c=c, d=d)) for a, b, c, d in
              [("relu", "relu", "relu", "relu"), ("sigmoid", "gelu", "tanh", "swish"), ("swish", "tanh", "gelu", "sigmoid")]]  # fmt: skip
# Different filters and kernels in every layer: even 'same' kernels (offset embedding), 'valid'
# stride-2 kernels 1..7 (output sizes 14, 12, 13 then 4, 6, 6: spatial masks), 4..16 channels.
MIXED = [
    Genome.parse("NC 8 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;"),
    Genome.parse("NC 4 2 sigmoid;RC 8 5 gelu;NC 16 4 tanh;RC 4 2 swish;FL gelu;"),
    Genome.parse("NC 16 7 swish;RC 4 1 tanh;NC 4 1 gelu;RC 16 7 sigmoid;FL sigmoid;"),
]


@pytest.fixture(scope="module")
def dd():
    return to_device(synthetic_dataset(384, 128, 200, seed=2), eval_batch=128)


def assert_matches_solo(genomes, batched, dd, cfg):
    for g, b in zip(genomes, batched, strict=True):
        solo = train_and_evaluate(g, dd, cfg, seed=0, keep_variables=True)
        assert b.genome == str(g) and b.status == solo.status == "FINISHED"
        for k in ("train_loss", "val_loss"):
            np.testing.assert_allclose(b.history[k], solo.history[k], rtol=2e-4)
        assert b.test_accuracy == pytest.approx(solo.test_accuracy, abs=1 / 200 + 1e-9)  # at most one near-tie flips
        assert b.param_count == solo.param_count
        if b.variables is not None:  # the genome's own trained weights, cut out of the bucket
            flat_b, flat_s = jax.tree_util.tree_leaves(b.variables), jax.tree_util.tree_leaves(solo.variables)
            for x, y in zip(flat_b, flat_s, strict=True):
                np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-4)


@pytest.mark.slow  # compiles vmapped buckets: 6-11 s
def test_same_shape_batch_equals_solo(dd):
    cfg = TrainConfig(batch_size=64, epochs=2)
    assert_matches_solo(SAME_SHAPE, train_batched(SAME_SHAPE, dd, cfg, seed=0), dd, cfg)


@pytest.mark.slow  # compiles vmapped buckets: 6-11 s
def test_masked_bucket_equals_solo(dd):
    cfg = TrainConfig(batch_size=64, epochs=2)
    bucket = bucket_of(MIXED)
    assert bucket == (("NC", 16, 7, 2), ("RC", 16, 5, 1), ("NC", 16, 4, 1), ("RC", 16, 7, 2))
    assert_matches_solo(MIXED, train_batched(MIXED, dd, cfg, seed=0, keep=True), dd, cfg)


def test_a_genome_alone_in_a_bigger_bucket(dd):
    """Padding alone (one model, bucket of the others) changes nothing either."""
    cfg = TrainConfig(batch_size=64, epochs=1)
    assert_matches_solo(MIXED[1:2], train_batched(MIXED[1:2], dd, cfg, seed=0, bucket=bucket_of(MIXED)), dd, cfg)


def test_embedding_round_trip():
    bucket = bucket_of(MIXED)
    for g in MIXED:
        v = init_variables(g, 3)
        big = embed_variables(g, bucket, v)
        assert big["params"]["Conv_0"]["kernel"].shape == (7, 7, 1, 16)
        back = extract_variables(g, bucket, big)
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(v), strict=True):
            np.testing.assert_array_equal(x, y)
        # everything outside the genome's own weights is padding: zero, or one for BN scale / running var
        kernel = big["params"]["Conv_0"]["kernel"]
        assert np.count_nonzero(kernel) == np.count_nonzero(v["params"]["Conv_0"]["kernel"])


def test_masks_place_even_kernels_like_xla_same_padding():
    bucket = (("NC", 8, 7, 1), ("RC", 8, 3, 3), ("NC", 8, 3, 3), ("RC", 8, 3, 3))
    g = Genome.parse("NC 8 4 relu;RC 8 3 relu;NC 8 3 relu;RC 8 3 relu;FL relu;")
    k = masks(g, bucket)["kernel_0"][:, :, 0, 0]
    rows = np.flatnonzero(k.any(axis=1))
    assert rows.tolist() == [2, 3, 4, 5]  # (7-1)//2 - (4-1)//2 = 2: one zero row fewer before than after


def test_divergence_is_per_model(dd):
    cfg = TrainConfig(batch_size=64, epochs=1, learning_rate=1e4, schedule="constant")
    results = train_batched(SAME_SHAPE[:2], dd, cfg, seed=0)
    assert all(r.status == "FAILED" and "diverged" in r.reason for r in results)


def test_bucket_needs_one_layout_and_must_fit():
    other = Genome.parse("NC 4 3 relu;NC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;", SearchSpace(layout=("NC", "NC", "NC", "RC")))
    with pytest.raises(ValueError, match="one layout"):
        bucket_of([MIXED[0], other])
    with pytest.raises(ValueError, match="does not fit bucket"):
        masks(MIXED[2], bucket_of(MIXED[:2]))


def test_plan_buckets_covers_the_population_within_the_limits():
    genomes = sample_population(SearchSpace(), 60, np.random.default_rng(0))
    genomes += [Genome.parse(BASE.format(a="tanh", b="relu", c="relu", d="relu")), *SAME_SHAPE]
    for max_models, max_waste in ((4, 1.0), (8, 2.0), (16, 4.0)):
        groups = plan_buckets(genomes, max_models, max_waste)
        flat = [g for group in groups for g in group]
        assert sorted(map(str, flat)) == sorted(map(str, genomes))  # each genome exactly once
        for group in groups:
            assert len(group) <= max_models
            alone = sum(bucket_cost(bucket_of([g])) for g in group)
            assert bucket_cost(bucket_of(group)) * len(group) <= max_waste * alone
    same = next(grp for grp in plan_buckets(genomes, 4, 1.0) if SAME_SHAPE[0] in grp)
    assert len(same) == 4 and len({signature(g) for g in same}) == 1  # no waste allowed: one shape per bucket
    assert len(plan_buckets(genomes, 16, 4.0)) < len(plan_buckets(genomes, 16, 1.0))
