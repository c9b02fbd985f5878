import numpy as np
import pytest
from helpers import every_genome, moves

from fmnas_jax import Genome, SearchSpace, count_params
from fmnas_jax.genome import ImageShape, fresh_genome, neighbours, output_shapes, random_genome, sample_population, train_flops_per_image

PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"
SPACE = SearchSpace()


def test_paper_genome_round_trip_and_params():
    g = Genome.parse(PAPER)
    assert str(g) == PAPER
    assert count_params(g) == 16598


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # hand-computed: conv k*k*cin*f + f + 4f (BatchNorm), head c*64 + 64 + 64*10 + 10
        ("NC 4 1 relu;RC 4 1 relu;NC 4 1 relu;RC 4 1 relu;FL relu;", (1 * 4 + 4 + 16) + 3 * (4 * 4 + 4 + 16) + (4 * 64 + 64 + 650)),
        (
            "NC 64 7 tanh;RC 64 7 gelu;NC 64 7 swish;RC 64 7 relu;FL sigmoid;",
            (49 * 64 + 64 + 256) + 3 * (49 * 64 * 64 + 64 + 256) + (64 * 64 + 64 + 650),
        ),
        (
            "NC 8 3 relu;RC 16 3 relu;NC 32 3 relu;RC 64 3 relu;FL relu;",
            (9 * 8 + 8 + 32) + (9 * 8 * 16 + 16 + 64) + (9 * 16 * 32 + 32 + 128) + (9 * 32 * 64 + 64 + 256) + (64 * 64 + 64 + 650),
        ),
    ],
)
def test_hand_computed_param_counts(text, expected):
    assert count_params(Genome.parse(text)) == expected


def test_round_trip_many_random_genomes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = random_genome(SPACE, rng)
        assert str(Genome.parse(str(g))) == str(g)
        assert Genome.parse(str(g)) == g
        assert Genome.parse(str(g)).key == g.key


def test_key_is_stable_and_distinct():
    assert Genome.parse(PAPER).key == Genome.parse(PAPER).key
    assert Genome.parse(PAPER).key != Genome.parse(PAPER.replace("FL gelu", "FL relu")).key
    assert len(Genome.parse(PAPER).key) == 16


def test_whitespace_is_tolerated_but_output_canonical():
    g = Genome.parse("  NC 4 5 sigmoid ; RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu ")
    assert str(g) == PAPER


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("NC 4 5 sigmoid;RC 64 8 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["kernel size 8 in layer 2 (RC) is not in [1..7]"]),
        ("NC 4 0 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["kernel size 0 in layer 1 (NC)", "[1..7]"]),
        ("NC 5 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["filters 5 in layer 1 (NC)", "[4, 8, 16, 32, 64]"]),
        ("NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 elu;RC 64 3 relu;FL gelu;", ["activation 'elu' in layer 3 (NC)", "relu"]),
        ("NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL softmax;", ["activation 'softmax' in layer 5 (FL)"]),
        ("NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;FL gelu;", ["has 4 layers; expected 5"]),
        ("NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;FL gelu;", ["has 6 layers; expected 5"]),
        ("RC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["layer type 'RC' in layer 1 (NC)"]),
        ("NC four 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["filters 'four' in layer 1 (NC)"]),
        ("NC 4 5;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;", ["in layer 1 (NC) is malformed"]),
        ("", ["genome is empty"]),
        ("hello world", ["has 1 layers"]),
    ],
)
def test_bad_genomes_name_the_bad_value(text, fragments):
    with pytest.raises(ValueError) as info:
        Genome.parse(text)
    for f in fragments:
        assert f in str(info.value)


def test_narrower_space_rejects_outside_genes():
    small = SearchSpace(kernel_sizes=(1, 3, 5), filters=(4, 8))
    with pytest.raises(ValueError, match="filters 64 in layer 2"):
        Genome.parse(PAPER, small)
    with pytest.raises(ValueError, match=r"kernel size 2 in layer 1 \(NC\) is not in \[1, 3, 5\]"):
        Genome.parse("NC 4 2 relu;RC 4 1 relu;NC 4 1 relu;RC 4 1 relu;FL relu;", small)


def test_search_space_validation():
    with pytest.raises(ValueError, match=r"kernel sizes \[8\]"):
        SearchSpace(kernel_sizes=(3, 8))
    with pytest.raises(ValueError, match="activations \\['elu'\\]"):
        SearchSpace(activations=("relu", "elu"))
    with pytest.raises(ValueError, match="layer types"):
        SearchSpace(layout=("NC", "XC"))
    with pytest.raises(ValueError, match="shrinks the data's 28x28 images to nothing"):
        SearchSpace(layout=("RC",) * 5)
    with pytest.raises(ValueError, match=r"kernel 7 shrinks the data's 8x8 images to nothing \(smaller kernel_sizes"):
        SearchSpace().for_image(ImageShape(8, 8, 1, 10))  # scikit-learn's digits need kernels up to 3
    assert SearchSpace(kernel_sizes=(1, 2, 3)).for_image(ImageShape(8, 8, 1, 10)).image.hw == (8, 8)


def test_output_sizes_follow_same_and_valid():
    assert output_shapes(Genome.parse(PAPER)) == [(28, 28), (13, 13), (13, 13), (6, 6)]
    assert output_shapes(Genome.parse("NC 4 7 relu;RC 4 7 relu;NC 4 7 relu;RC 4 7 relu;FL relu;")) == [(28, 28), (11, 11), (11, 11), (3, 3)]
    assert output_shapes(Genome.parse(PAPER), ImageShape(32, 20, 3, 5)) == [(32, 20), (15, 9), (15, 9), (7, 4)]


def test_parameters_and_flops_follow_the_datas_channels_and_classes():
    g = Genome.parse(PAPER)
    # 3 input channels add 2 x 5 x 5 x 4 first-layer weights; 5 classes remove 5 x 64 + 5 head parameters.
    assert count_params(g, ImageShape(28, 28, 3, 5)) == count_params(g) + 2 * 5 * 5 * 4 - 5 * 65
    assert count_params(g, ImageShape(8, 8, 1, 10)) == count_params(g)  # convolutions and the head do not depend on the size
    assert train_flops_per_image(g, ImageShape(56, 56, 1, 10)) > 3.9 * train_flops_per_image(g)


def test_flops_match_the_measured_note():
    assert 9.7e6 < train_flops_per_image(Genome.parse(PAPER)) < 9.9e6


def test_neighbours_are_one_gene_away_and_in_space():
    g = Genome.parse(PAPER)
    nbrs = neighbours(g, SPACE)
    assert len(nbrs) == len({str(n) for n in nbrs})
    for n in nbrs:
        Genome.parse(str(n))  # in the space
        diff = sum(a != b for a, b in zip(str(n).replace(";", " ").split(), str(g).replace(";", " ").split(), strict=True))
        assert diff == 1
    # layer 1: kernel 4,6; filters 8; 4 activations -> 7; layer 2: kernel 2,4; filters 32; 4 -> 7; x2; head 4
    assert len(nbrs) == 7 * 4 + 4


def test_population_is_distinct_and_seeded():
    a = sample_population(SPACE, 50, np.random.default_rng(1))
    b = sample_population(SPACE, 50, np.random.default_rng(1))
    assert [str(g) for g in a] == [str(g) for g in b]
    assert len({str(g) for g in a}) == 50
    with pytest.raises(ValueError, match="population size 0"):
        sample_population(SPACE, 0, np.random.default_rng(0))
    tiny = SearchSpace(kernel_sizes=(1,), filters=(4,), activations=("relu",))
    with pytest.raises(ValueError, match="exceeds the 1 genomes"):
        sample_population(tiny, 2, np.random.default_rng(0))


def test_fresh_genome_avoids_every_seen_collection_and_gives_up():
    small = SearchSpace(kernel_sizes=(1, 3), filters=(4,), activations=("relu",))  # 2**4 = 16 genomes
    every = {random_genome(small, np.random.default_rng(i)) for i in range(400)}
    assert len(every) == small.size
    keep = sorted(every, key=str)[0]
    half = set(sorted(every, key=str)[1:9])
    rest = set(sorted(every, key=str)[9:])
    assert fresh_genome(small, np.random.default_rng(0), half, rest, draws=500) == keep
    assert fresh_genome(small, np.random.default_rng(0), half, rest, {keep}, draws=500) is None


def test_activation_elements_of_the_paper_genome():
    from fmnas_jax.genome import activation_elements

    # 28x28x4 + 13x13x64 + 13x13x4 + 6x6x64 (RC: (n - k) // 2 + 1)
    assert activation_elements(Genome.parse(PAPER)) == 3136 + 10816 + 676 + 2304


def test_neighbours_are_every_genome_of_the_space_one_move_away():
    space = SearchSpace(kernel_sizes=(1, 2, 3), filters=(4, 8), activations=("relu", "gelu"), max_params=1300)
    g = Genome.parse("NC 4 2 relu;RC 4 2 gelu;NC 4 1 relu;RC 4 2 relu;FL relu;", space)
    assert space.fits(g)
    one = neighbours(g, space)
    assert set(one) == {h for h in every_genome(space) if moves(g, h, space) == 1 and space.fits(h)}
    assert len(one) == len(set(one)) and g not in one
