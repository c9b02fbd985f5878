"""What a search may spend: counting, reuse across searches, the time allowance, successive halving."""

import math

import numpy as np
import pytest

from fmnas_jax import Genome, SearchSpace
from fmnas_jax.backends import EvalSpec, InProcess
from fmnas_jax.budget import TimeBudget
from fmnas_jax.cost import CostModel, Sample, parse_duration
from fmnas_jax.data import FashionMnistData, synthetic_load
from fmnas_jax.evaluator import Evaluator
from fmnas_jax.genome import sample_population
from fmnas_jax.objective import Allowance, SearchObjective
from fmnas_jax.scheduler import Halving
from fmnas_jax.search import FitnessConfig
from fmnas_jax.search.fitness import RUNG_PENALTY
from fmnas_jax.store import Store
from fmnas_jax.train import TrainConfig

SPEC = EvalSpec(TrainConfig(epochs=1, batch_size=64), FashionMnistData(train_size=256, val_size=100), 0)
SPACE = SearchSpace(filters=(4,), kernel_sizes=(1, 2))


def _genomes(n, seed=0):
    return sample_population(SPACE, n, np.random.default_rng(seed))


def _objective(store, parent, own, count=None):
    ev = Evaluator(store, SPEC, InProcess(synthetic_load), parent)
    return SearchObjective(ev, FitnessConfig(), own, Allowance(count), n_train=256)


def test_budget_counts_new_and_own_results_but_not_other_searches(tracking_uri):
    store = Store(tracking_uri, "unit")
    g = _genomes(5)
    other = store.start_run("other search", "search", {})
    _objective(store, other, {other})(g[:2])  # another search trained g0, g1

    mine = store.start_run("mine", "search", {})
    obj = _objective(store, mine, {mine}, count=2)
    scores = obj(g)  # g0, g1 free (another search's); g2, g3 counted; g4 over the budget
    assert obj.allowance.spent == 2 and obj.exhausted
    assert all(math.isfinite(s) for s in scores[:4]) and scores[4] == -math.inf
    assert [o.reused for o in obj.outcomes.values()] == [True, True, False, False]

    rerun = store.start_run("mine, again", "search", {})
    again = _objective(store, rerun, {mine, rerun}, count=2)  # the same search resumed: its own results count
    assert again(g) == scores
    assert again.allowance.spent == 2 and again.evaluator.trained == 0  # retraces the path, trains nothing


def test_time_allowance_predicts_cost_and_keeps_a_reserve():
    now = [0.0]
    genome = _genomes(1)[0]
    cost = CostModel([Sample(genome, 1000, 10.0, 8.0)] * 6 + [Sample(genome, 2000, 18.0, 16.0)] * 6)  # 2 s + 8 ms per image
    assert cost.seconds(genome, 1000) == pytest.approx(10.0, rel=1e-6)
    allow = Allowance(budget=TimeBudget(100, clock=lambda: now[0]), cost=cost, parallelism=2, reserve=lambda: 40.0)
    admitted = [allow.admit(genome, 1000) for _ in range(20)]  # 5 s of wall each (2 slots); 60 s before the reserve
    assert admitted.count(True) == 12 and allow.exhausted
    allow.batch_done()
    now[0] = 55.0  # 45 s left, 40 of them reserved: one more 5-s evaluation fits, not two
    allow.allow(10)
    assert [allow.admit(genome, 1000) for _ in range(2)] == [True, False]
    assert allow.admit(genome, 0) is True  # a stored result (no images to train) costs no time: still admitted


class CountingEvaluator(Evaluator):
    """A real Evaluator that counts its store lookups."""

    lookups = 0

    def lookup(self, genome):
        self.lookups += 1
        return super().lookup(genome)


def test_an_uncalibrated_cost_model_admits_one_round_of_slots_at_a_time(tracking_uri):
    """On priors, a synchronous round trains at most one evaluation per slot until MIN_SAMPLES have finished;
    then the measured cost model admits the rest at once (an admitted evaluation is never cancelled).
    A later round looks up only the genomes the earlier rounds deferred."""
    assert Allowance(parallelism=2).round_limit() is None  # no time budget: nothing to protect
    store = Store(tracking_uri, "unit")
    parent = store.start_run("timed", "search", {})
    ev = CountingEvaluator(store, SPEC, InProcess(synthetic_load), parent)
    admitted_when_done: list[int] = []
    obj = SearchObjective(ev, FitnessConfig(), {parent}, Allowance(budget=TimeBudget(1e6), parallelism=2), n_train=256,
                          on_counted=lambda o: admitted_when_done.append(obj.allowance.spent))  # fmt: skip
    assert obj.allowance.round_limit() == 2
    scores = obj(_genomes(8, seed=3))
    assert all(math.isfinite(s) for s in scores) and ev.trained == 8 and not obj.exhausted
    assert admitted_when_done == [2, 2, 4, 4, 6, 6, 8, 8]  # 3 rounds of 2 on priors, then the measured model: the other 2 at once
    assert obj.allowance.cost.calibrated and obj.allowance.round_limit() is None
    # Each round: the genomes no earlier round finished, and once more the one that waited for the single in-process slot
    # (another process may have finished it meanwhile).
    assert ev.lookups == (8 + 6 + 4 + 2) + 4
    again = obj(_genomes(8, seed=3))  # all known to this objective: no lookup, no training
    assert again == scores and ev.lookups == 24 and ev.trained == 8


def test_cost_model_fits_speed_against_flops_from_one_rung():
    """Every sample trained the same number of images (one rung): speed still comes out per image."""
    from fmnas_jax.genome import train_flops_per_image

    genomes = _genomes(8, seed=5)
    true = lambda g: 1e-4 + train_flops_per_image(g) / 1e10  # noqa: E731  seconds per image
    cost = CostModel([Sample(g, 4000, 3.0 + 4000 * true(g), 4000 * true(g)) for g in genomes])
    for g in genomes:
        assert cost.seconds(g, 800_000) == pytest.approx(3.0 + 800_000 * true(g), rel=0.02)
    assert CostModel().seconds(genomes[0], 1000) > 0  # priors before any sample


def test_durations():
    assert parse_duration(600) == 600 and parse_duration("12m") == 720 and parse_duration("1.5h") == 5400 and parse_duration("90s") == 90
    for bad in ("ten minutes", "-5m", "0"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


class NoisyRung:
    """A synthetic rung: fitness = truth + noise shrinking with the rung (no training); counts calls per genome."""

    parallelism, exhausted = 1, False

    def __init__(self, truth, noise, rng):
        self.truth, self.noise, self.rng, self.outcomes, self.calls = truth, noise, rng, {}, {}

    def fitness_of(self, value):
        return value

    def __call__(self, genomes):
        for g in genomes:
            if g not in self.outcomes:
                self.calls[g] = self.calls.get(g, 0) + 1
                self.outcomes[g] = self.truth[g] + self.noise * self.rng.standard_normal()
        return [self.outcomes[g] for g in genomes]


def test_successive_halving_promotes_the_right_genomes_and_evaluates_each_rung_once():
    genomes = _genomes(27, seed=3)
    truth = {g: i / 27 for i, g in enumerate(genomes)}  # the last genome is the best
    rng = np.random.default_rng(0)
    rungs = [NoisyRung(truth, 0.01, rng), NoisyRung(truth, 0.005, rng), NoisyRung(truth, 0.0, rng)]
    obj = Halving(rungs, eta=3)
    scores = obj(genomes)
    assert len(rungs[0].outcomes) == 27 and len(rungs[1].outcomes) == 9 and len(rungs[2].outcomes) == 3
    assert set(rungs[2].outcomes) == set(genomes[-3:])  # noise well below the gaps: the true top three reach the top
    assert max(range(27), key=lambda i: scores[i]) == 26
    assert scores[0] < -RUNG_PENALTY * 1.5 and -RUNG_PENALTY - 1 < scores[-4] < -RUNG_PENALTY + 1  # screened out at rungs 0 and 1
    obj(genomes)  # asking again trains nothing
    assert all(c == 1 for r in rungs for c in r.calls.values())
    assert obj.parallelism == 9


def test_hill_climber_screens_neighbours_through_halving():
    from fmnas_jax.search import HillClimbConfig, hill_climb

    space = SearchSpace(filters=(4, 8, 16), kernel_sizes=(1, 2, 3, 4, 5))
    target = Genome.parse("NC 16 5 relu;RC 8 3 gelu;NC 4 2 tanh;RC 16 1 swish;FL sigmoid;", space)

    def closeness(g):  # minus the number of single-gene moves to the target
        d = int(g.head_activation != target.head_activation)
        for a, b in zip(g.convs, target.convs, strict=True):
            d += (
                abs(a.kernel - b.kernel)
                + abs(space.filters.index(a.filters) - space.filters.index(b.filters))
                + (a.activation != b.activation)
            )
        return -float(d)

    class Truth(dict):
        def __missing__(self, g):
            return closeness(g)

    rng = np.random.default_rng(0)
    rungs = [NoisyRung(Truth(), 0.01, rng), NoisyRung(Truth(), 0.0, rng)]
    res = hill_climb(space, Halving(rungs, eta=3), np.random.default_rng(1), HillClimbConfig(move="steepest", max_restarts=0))
    assert res.best == target
    assert len(rungs[1].outcomes) < len(rungs[0].outcomes) / 2  # most neighbours were screened out cheaply


def test_the_cost_model_counts_the_datas_images():
    """Per-image FLOPs and activations follow the data's shape: larger colour images cost more per image."""
    from fmnas_jax.genome import ImageShape

    g = Genome.parse("NC 8 3 relu;RC 16 3 relu;NC 8 3 relu;RC 16 3 relu;FL relu;")
    small, colour = CostModel(image=ImageShape(8, 8, 1, 10)), CostModel(image=ImageShape(32, 32, 3, 5))
    assert small.seconds(g, 10_000) < CostModel().seconds(g, 10_000) < colour.seconds(g, 10_000)
    samples = [Sample(g, 4000, 2.0 + 4000 * 1e-4, 4000 * 1e-4)] * 12  # measured on this data: calibrated to it
    assert CostModel(samples, image=ImageShape(32, 32, 3, 5)).seconds(g, 4000) == pytest.approx(2.0 + 4000 * 1e-4, rel=0.05)


def test_cost_model_sees_memory_bound_genomes():
    """Wide layers at full resolution are slow beyond their FLOPs: the activations term captures it."""
    from fmnas_jax.genome import activation_elements

    genomes = sample_population(SearchSpace(), 10, np.random.default_rng(11))
    true = lambda g: 1e-4 + activation_elements(g) * 4e-8  # noqa: E731
    cost = CostModel([Sample(g, 4000, 5.0 + 4000 * true(g), 4000 * true(g)) for g in genomes])
    for g in genomes:
        assert cost.seconds(g, 60_000) == pytest.approx(5.0 + 60_000 * true(g), rel=0.05)
