import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnas_jax import Genome, SearchSpace, count_params
from fmnas_jax.genome import sample_population
from fmnas_jax.model import GenomeCNN, init_variables, variable_count

PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"


def test_flax_variables_match_count_params_for_paper_genome():
    v = init_variables(Genome.parse(PAPER), 0)
    assert variable_count(v) == count_params(Genome.parse(PAPER)) == 16598
    assert set(v) == {"params", "batch_stats"}


def test_flax_variables_match_count_params_for_random_genomes():
    for g in sample_population(SearchSpace(), 12, np.random.default_rng(3)):
        assert variable_count(init_variables(g, 0)) == count_params(g), str(g)


@pytest.mark.parametrize("text", [PAPER, "NC 64 7 tanh;RC 8 7 swish;NC 16 1 gelu;RC 4 7 relu;FL tanh;"])
def test_output_shape_and_finite(text):
    g = Genome.parse(text)
    v = init_variables(g, 0)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    logits = GenomeCNN(g).apply(v, x, train=False)
    assert logits.shape == (3, 10)
    assert bool(jnp.isfinite(logits).all())


def test_layer_order_conv_act_batchnorm_and_strides():
    g = Genome.parse(PAPER)
    v = init_variables(g, 0)
    p = v["params"]
    assert p["Conv_0"]["kernel"].shape == (5, 5, 1, 4)
    assert p["Conv_1"]["kernel"].shape == (3, 3, 4, 64)
    assert p["BatchNorm_3"]["scale"].shape == (64,)
    assert p["Dense_0"]["kernel"].shape == (64, 64)
    assert p["Dense_1"]["kernel"].shape == (64, 10)
    # training mode updates the BatchNorm running statistics
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1)) + 3.0
    _, upd = GenomeCNN(g).apply(v, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(upd["batch_stats"]["BatchNorm_0"]["mean"], v["batch_stats"]["BatchNorm_0"]["mean"])


def test_init_is_seeded_and_follows_flax_defaults():
    g = Genome.parse(PAPER)
    a, b, c = init_variables(g, 0), init_variables(g, 0), init_variables(g, 1)
    k = a["params"]["Conv_2"]["kernel"]  # (5, 5, 64, 4): fan_in 1600
    assert np.array_equal(k, b["params"]["Conv_2"]["kernel"]) and not np.array_equal(k, c["params"]["Conv_2"]["kernel"])
    assert abs(k.std() - (1 / 1600) ** 0.5) < 0.1 * (1 / 1600) ** 0.5 and np.abs(k).max() <= 2 * (1 / 1600) ** 0.5 / 0.8796 + 1e-6
    assert np.all(a["params"]["Conv_2"]["bias"] == 0) and np.all(a["batch_stats"]["BatchNorm_1"]["var"] == 1)
    flax_tree = jax.tree_util.tree_structure(GenomeCNN(g).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
    assert jax.tree_util.tree_structure(a) == flax_tree
