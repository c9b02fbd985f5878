import math

import numpy as np
import pytest

from fmnas_jax import Genome, SearchSpace
from fmnas_jax.genome import random_genome
from fmnas_jax.search import (
    FitnessConfig,
    HillClimbConfig,
    fitness,
    hill_climb,
    pareto_front,
    random_search,
    regularized_evolution,
    table_climb,
)

SPACE = SearchSpace()
TARGET = Genome.parse("NC 16 3 relu;RC 32 5 gelu;NC 8 2 tanh;RC 64 7 swish;FL sigmoid;")


def distance(g: Genome, t: Genome = TARGET) -> int:
    d = int(g.head_activation != t.head_activation)
    for a, b in zip(g.convs, t.convs, strict=True):
        d += abs(a.kernel - b.kernel) + abs(SPACE.filters.index(a.filters) - SPACE.filters.index(b.filters))
        d += int(a.activation != b.activation)
    return d


class TableObjective:
    """Synthetic fitness (no training): minus the gene distance to TARGET; counts distinct evaluations."""

    parallelism = 1

    def __init__(self, budget: int):
        self.budget, self.seen, self._exhausted = budget, {}, False

    @property
    def exhausted(self):
        return self._exhausted

    def __call__(self, genomes):
        out = []
        for g in genomes:
            if str(g) not in self.seen:
                if len(self.seen) >= self.budget:
                    self._exhausted = True
                    out.append(-math.inf)
                    continue
                self.seen[str(g)] = -distance(g)
            out.append(self.seen[str(g)])
        return out


@pytest.mark.parametrize("move", ["first", "steepest"])
def test_hill_climb_finds_the_known_optimum(move):
    obj = TableObjective(budget=5000)
    cfg = HillClimbConfig(move=move, patience=1, max_restarts=0)
    res = hill_climb(SPACE, obj, np.random.default_rng(0), cfg)
    assert res.best == TARGET and res.best_fitness == 0
    assert res.path[-1].move == "optimum"
    fits = [s.fitness for s in res.path if s.move == "improve"]
    assert fits == sorted(fits)  # every move improves


def test_hill_climb_respects_the_budget():
    obj = TableObjective(budget=25)
    res = hill_climb(SPACE, obj, np.random.default_rng(1), HillClimbConfig(budget=25, patience=3))
    assert len(obj.seen) == 25 and obj.exhausted
    assert res.path[-1].move == "budget"
    assert res.best_fitness == max(obj.seen.values())


def test_hill_climb_restarts_until_patience():
    # A flat landscape: every start is a local optimum, so each restart brings nothing new.
    class Flat(TableObjective):
        def __call__(self, genomes):
            for g in genomes:
                self.seen[str(g)] = 0.0
            return [0.0] * len(genomes)

    obj = Flat(budget=10**6)
    res = hill_climb(SPACE, obj, np.random.default_rng(2), HillClimbConfig(patience=3, max_restarts=10))
    restarts = sorted({s.restart for s in res.path})
    assert restarts == [0, 1, 2, 3]  # the first climb sets the best, then 3 restarts without improvement


def test_min_gain_moves_only_beyond_the_threshold():
    from fmnas_jax.search.hillclimb import HillClimber

    start = random_genome(SPACE, np.random.default_rng(3))

    def moves(min_gain: float) -> tuple[list, list]:
        climber = HillClimber(SPACE, np.random.default_rng(4), HillClimbConfig(min_gain=min_gain), population=[start])
        assert climber.ask() == start
        climber.tell(start, 0.5)
        asked = [climber.ask() for _ in range(3)]  # all asked before any result: the climb stays at `start`
        for g, gain in zip(asked, [0.004, 0.012, -0.1], strict=True):
            climber.tell(g, 0.5 + gain)
        return asked, [s.genome for s in climber.path if s.move == "improve"]

    asked, moved = moves(0.0)
    assert moved == [asked[0]]  # without a threshold a 0.4-point gain moves the climb
    asked, moved = moves(0.008)
    assert moved == [asked[1]]  # with 0.8 points, only the 1.2-point gain does


def test_min_gain_outside_its_range_is_refused():
    with pytest.raises(ValueError, match=r"search.min_gain 1.0 must be >= 0 and < 1"):
        HillClimbConfig(min_gain=1.0)


def test_hill_climb_is_deterministic():
    a = hill_climb(SPACE, TableObjective(60), np.random.default_rng(7), HillClimbConfig(budget=60))
    b = hill_climb(SPACE, TableObjective(60), np.random.default_rng(7), HillClimbConfig(budget=60))
    assert a == b


class Scripted:
    """Stands in for the Generator: returns the given start rows in order."""

    def __init__(self, starts):
        self.starts = list(starts)

    def integers(self, n):
        return self.starts.pop(0)


def test_table_climber_reproduces_a_hand_computed_path():
    cfg = FitnessConfig(size_weight=0.01, reference_params=1000)
    table = [("A", 1000, 0.80), ("B", 2000, 0.85), ("C", 4000, 0.84), ("D", 8000, 0.90), ("E", 16000, 0.905)]
    rows = [(g, p, a, fitness(cfg, a, p)) for g, p, a in table]
    res = table_climb(rows[::-1], Scripted([2, 0, 4, 3, 1, 2]), patience=2)
    got = [(s.restart, s.genome, s.move) for s in res.path]
    assert got == [
        (0, "C", "start"),
        (0, "B", "left"),
        (0, "B", "optimum"),
        (1, "A", "start"),
        (1, "B", "right"),
        (1, "B", "optimum"),
        (2, "E", "start"),
        (2, "E", "optimum"),
        (3, "D", "start"),
        (3, "D", "optimum"),
        (4, "B", "start"),
        (4, "B", "optimum"),
        (5, "C", "start"),
        (5, "B", "left"),
        (5, "B", "optimum"),
    ]
    assert res.best == "D" and res.best_fitness == pytest.approx(0.87)


def test_table_climber_size_weight_changes_the_winner():
    table = [("small", 1000, 0.80), ("big", 64000, 0.83)]
    for weight, winner in ((0.0, "big"), (0.01, "small")):
        cfg = FitnessConfig(size_weight=weight, reference_params=1000)
        rows = [(g, p, a, fitness(cfg, a, p)) for g, p, a in table]
        assert table_climb(rows, Scripted([0, 0, 0, 0]), patience=2).best == winner


def test_fitness_formula_on_hand_made_points():
    cfg = FitnessConfig(accuracy_weight=1.0, size_weight=0.01, reference_params=16598)
    assert fitness(cfg, 0.9, 16598) == pytest.approx(0.9)
    assert fitness(cfg, 0.9, 4 * 16598) == pytest.approx(0.88)
    assert fitness(cfg, 0.9, 16598 // 2) == pytest.approx(0.91, abs=1e-4)
    assert fitness(FitnessConfig(accuracy_weight=2.0, size_weight=0.0), 0.9, 10**6) == pytest.approx(1.8)
    assert fitness(cfg, float("nan"), 100) == -math.inf
    timed = FitnessConfig(size_weight=0.0, compute_weight=0.01, reference_flops=1e6)
    assert fitness(timed, 0.9, 123, flops=4e6) == pytest.approx(0.88)  # 4x the compute costs 2 points
    assert fitness(timed, 0.9, 123, flops=0.5e6) == pytest.approx(0.91)
    assert fitness(cfg, 0.9, 16598, flops=4e6) == pytest.approx(0.9)  # compute_weight 0: FLOPs ignored


def test_pareto_front_on_hand_made_points():
    pts = [(100, 0.80), (200, 0.85), (150, 0.79), (300, 0.85), (400, 0.90), (50, 0.70), (500, float("nan"))]
    assert pareto_front(pts) == [5, 0, 1, 4]
    assert pareto_front([]) == []


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"metric": "test_accuracy"}, "paper_reproduction=true"),
        ({"metric": "loss"}, "fitness.metric 'loss'"),
        ({"size_weight": float("nan")}, "fitness.size_weight nan"),
        ({"size_weight": -1.0}, "must be >= 0"),
        ({"accuracy_weight": 0.0}, "fitness.accuracy_weight 0.0"),
        ({"compute_weight": -0.1}, "fitness.compute_weight -0.1 must be >= 0"),
        ({"reference_flops": 0.0}, "fitness.reference_flops 0.0 must be > 0"),
    ],
)
def test_fitness_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        FitnessConfig(**kwargs)


def test_search_config_validation():
    with pytest.raises(ValueError, match="search.population_size 0"):
        HillClimbConfig(population_size=0)
    with pytest.raises(ValueError, match="search.population_size -3"):
        HillClimbConfig(population_size=-3)
    with pytest.raises(ValueError, match="search.strategy 'anneal'"):
        HillClimbConfig(strategy="anneal")


def _evolve(seed: int, budget: int, population: int = 10):
    obj, rng = TableObjective(budget), np.random.default_rng(seed)
    start = [random_genome(SPACE, rng) for _ in range(population)]
    return regularized_evolution(SPACE, obj, rng, dict(zip(start, obj(start), strict=True)), tournament_size=5), obj


def test_random_search_respects_the_budget_and_is_seeded():
    obj = TableObjective(budget=30)
    res = random_search(SPACE, obj, np.random.default_rng(3), {})
    assert len(obj.seen) == 30 and obj.exhausted
    assert res.best_fitness == max(obj.seen.values()) and str(res.best) in obj.seen
    again = random_search(SPACE, TableObjective(budget=30), np.random.default_rng(3), {})
    other = random_search(SPACE, TableObjective(budget=30), np.random.default_rng(4), {})
    assert again == res and other.path != res.path


def test_regularized_evolution_respects_the_budget_and_is_seeded():
    res, obj = _evolve(5, budget=60)
    assert len(obj.seen) == 60 and obj.exhausted
    assert res.best_fitness == max(obj.seen.values())
    children = [s for s in res.path if s.move == "child"]
    assert len(children) == 50 and len({c.genome for c in children}) == 50  # 10 starters + 50 new children
    assert _evolve(5, budget=60)[0] == res and _evolve(6, budget=60)[0].path != res.path


def test_local_search_beats_random_search_at_equal_budget_on_a_smooth_landscape():
    # The synthetic landscape rewards closeness gene by gene, as NAS landscapes roughly do: with the same
    # number of evaluations, hill climbing and evolution should end closer to the optimum than random sampling.
    budget, seeds = 150, range(5)
    rand = [random_search(SPACE, TableObjective(budget), np.random.default_rng(s), {}).best_fitness for s in seeds]
    cfg = HillClimbConfig(budget=budget)
    climb = [hill_climb(SPACE, TableObjective(budget), np.random.default_rng(s), cfg).best_fitness for s in seeds]
    evolve = [_evolve(s, budget)[0].best_fitness for s in seeds]
    assert np.mean(climb) > np.mean(rand) and np.mean(evolve) > np.mean(rand), (climb, evolve, rand)


def _optuna(seed: int, budget: int, sampler: str = "tpe"):
    from fmnas_jax.search.base import drive
    from fmnas_jax.search.optuna_search import OptunaSearch

    obj = TableObjective(budget)
    return drive(OptunaSearch(SPACE, seed, sampler), obj), obj


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_optuna_respects_the_budget_and_is_seeded(sampler):
    pytest.importorskip("optuna")
    res, obj = _optuna(1, 40, sampler)
    assert len(obj.seen) == 40 and obj.exhausted
    assert res.best_fitness == max(obj.seen.values()) and str(res.best) in obj.seen
    assert _optuna(1, 40, sampler)[0] == res and _optuna(2, 40, sampler)[0].path != res.path


def test_optuna_genes_round_trip_and_keep_to_the_size_cap():
    pytest.importorskip("optuna")
    from fmnas_jax.search.optuna_search import OptunaSearch, decode, encode

    assert decode(encode(TARGET, SPACE), SPACE) == TARGET
    capped = SearchSpace(max_params=5000)
    search = OptunaSearch(capped, seed=0)
    asked = [search.ask() for _ in range(30)]
    assert all(capped.fits(g) for g in asked)
    for g in asked:
        search.tell(g, -distance(g))
    failed = [t for t in search.study.trials if t.state.name == "FAIL"]
    assert len(search.study.trials) == 30 + len(failed)  # over-the-cap proposals are failed trials, not evaluations


def test_optuna_learns_from_known_results_and_a_higher_rung_adds_a_trial():
    pytest.importorskip("optuna")
    from fmnas_jax.search.optuna_search import OptunaSearch

    known = {random_genome(SPACE, np.random.default_rng(i)): float(-i) for i in range(5)}
    search = OptunaSearch(SPACE, seed=0, known=known)
    assert len(search.study.trials) == 5
    g = search.ask()
    search.tell(g, -30.0)  # a rung-0 result
    search.tell(g, -2.5)  # the same genome from a higher rung
    assert len(search.study.trials) == 7 and max(t.value for t in search.study.trials if t.params == search.study.trials[-1].params) == -2.5
    assert search.scores[g] == -2.5


def test_tpe_beats_random_sampling_at_equal_budget_on_a_smooth_landscape():
    pytest.importorskip("optuna")
    budget, seeds = 120, range(4)
    tpe = [_optuna(s, budget)[0].best_fitness for s in seeds]
    rand = [random_search(SPACE, TableObjective(budget), np.random.default_rng(s), {}).best_fitness for s in seeds]
    assert np.mean(tpe) > np.mean(rand), (tpe, rand)
