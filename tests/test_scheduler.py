"""Asynchronous successive halving on a synthetic fitness, with a real MLflow store and a simulated clock.

The backend trains nothing: each (genome, rung) "takes" a duration on a simulated clock and returns a
fixed accuracy, so the order results arrive in is deterministic and known, as real workers' is not.
"""

import math

import numpy as np
import pytest

from fmnas_jax import Genome, SearchSpace
from fmnas_jax.backends import EvalSpec
from fmnas_jax.data import FashionMnistData
from fmnas_jax.evaluator import Evaluator
from fmnas_jax.genome import count_params, sample_population
from fmnas_jax.objective import Allowance, SearchObjective
from fmnas_jax.scheduler import Halving
from fmnas_jax.search import FitnessConfig, HillClimbConfig
from fmnas_jax.search.base import drive
from fmnas_jax.search.fitness import RUNG_PENALTY
from fmnas_jax.search.hillclimb import HillClimber
from fmnas_jax.search.random_search import RandomSearch
from fmnas_jax.store import Store
from fmnas_jax.train import EvalResult, TrainConfig

SPACE = SearchSpace(filters=(4, 8), kernel_sizes=(1, 2, 3))
RUNG_EPOCHS = (1, 2, 4)


def truth(g: Genome) -> float:
    """A smooth synthetic accuracy in (0, 1): more filters and larger kernels help, relu and tanh are best."""
    score = sum(c.filters / 8 + c.kernel / 3 + (c.activation in ("relu", "tanh")) for c in g.convs) + (g.head_activation == "relu")
    return 0.3 + 0.6 * score / 13


class SimulatedWorkers:
    """`parallelism` slots on a simulated clock: a job finishes `epochs x (1 + filters/8)` time units after it starts."""

    streams_epochs = False

    def __init__(self, parallelism: int, fail_after: int | None = None):
        self.parallelism, self.clock, self.fail_after = parallelism, 0.0, fail_after
        self.running: list[tuple[float, int, object, Genome, EvalSpec]] = []
        self.trained: list[tuple[str, int]] = []
        self.most_in_flight, self._n = 0, 0

    def submit(self, tag, genome, spec, on_epoch=None):
        duration = spec.trainer.epochs * (1 + genome.convs[0].filters / 8)
        self.running.append((self.clock + duration, self._n, tag, genome, spec))
        self._n += 1
        self.most_in_flight = max(self.most_in_flight, len(self.running))

    def evaluate(self, genomes, spec, on_epoch=None):  # a synchronous batch (fidelity mode halving)
        for g in genomes:
            self.submit(g, g, spec)
        return [self.next_result() for _ in genomes]

    def next_result(self, timeout=None):
        if not self.running:
            return None
        if self.fail_after is not None and len(self.trained) >= self.fail_after:
            raise KeyboardInterrupt  # Ctrl-C while evaluations are in flight
        self.running.sort(key=lambda j: (j[0], j[1]))
        end, _, tag, genome, spec = self.running.pop(0)
        self.clock = end
        self.trained.append((str(genome), spec.trainer.epochs))
        acc = truth(genome) - 0.05 / spec.trainer.epochs  # cheaper rungs underestimate a little, uniformly
        history = {"train_loss": [1 - acc], "val_accuracy": [acc]}
        return tag, EvalResult(str(genome), "FINISHED", count_params(genome), val_accuracy=acc, train_accuracy=acc, val_loss=1 - acc,
                               train_loss=1 - acc, history=history, wall_seconds=1.0, train_seconds=0.5, images_trained=100)  # fmt: skip


def _rungs(store: Store, backend, parent: str, own: set, count: int):
    allowance = Allowance(count)
    rungs = []
    for r, epochs in enumerate(RUNG_EPOCHS):
        spec = EvalSpec(TrainConfig(epochs=epochs, batch_size=64), FashionMnistData(train_size=256, val_size=100), 0, test=False)
        ev = Evaluator(store, spec, backend, parent, rung=r)
        rungs.append(SearchObjective(ev, FitnessConfig(size_weight=0.0), own, allowance, n_train=256))
    return rungs


def _search(store: Store, backend, own: set, count: int = 40, seed: int = 0, climb: bool = False, barrier: bool = False):
    parent = store.start_run("search", "search", {"search_key": "k"})
    own = own | {parent}
    rungs = _rungs(store, backend, parent, own, count)
    rng = np.random.default_rng(seed)
    population = sample_population(SPACE, 9, rng)
    strategy = (
        HillClimber(SPACE, rng, HillClimbConfig(), population=population, eager=True) if climb else RandomSearch(SPACE, rng, {}, population)
    )
    halving = Halving(rungs, eta=3, backend=backend)
    result = drive(strategy, halving) if barrier else halving.run(strategy)
    store.end_run(parent, "FINISHED")
    return parent, rungs, result


def test_asha_promotes_the_top_third_of_each_rung_so_far_and_keeps_every_slot_busy(tracking_uri):
    store, backend = Store(tracking_uri, "asha"), SimulatedWorkers(parallelism=3)
    _, rungs, result = _search(store, backend, set(), count=40)
    done = [set(r.outcomes) for r in rungs]
    assert len(backend.trained) == 40 and len(set(backend.trained)) == 40  # each (genome, rung) trained once
    assert done[2] <= done[1] <= done[0]  # promoted only from the rung below
    for r in (0, 1):  # at the end, every genome in the top third of a rung has gone up
        ranked = sorted(rungs[r].outcomes, key=lambda g: -truth(g))
        assert set(ranked[: len(ranked) // 3]) <= done[r + 1] | {g for g in ranked if (str(g), RUNG_EPOCHS[r + 1]) in backend.running}
    assert backend.most_in_flight == 3
    best = max(truth(g) for g in done[2])
    assert truth(result.best) == best and result.best_fitness == pytest.approx(best - 0.05 / 4)
    below = next(iter(done[0] - done[1]))
    assert rungs[0].fitness_of(rungs[0].outcomes[below]) - 2 * RUNG_PENALTY < result.best_fitness  # penalised below the top


@pytest.mark.parametrize("strategy", [True, "optuna"])
def test_a_rerun_trains_nothing_and_retraces_the_same_path(tracking_uri, strategy):
    if strategy == "optuna":
        pytest.importorskip("optuna")
    store = Store(tracking_uri, "asha")
    first_parent, first_rungs, first = _search(store, SimulatedWorkers(3), set(), climb=strategy)
    again = SimulatedWorkers(3)
    _, rungs, second = _search(store, again, {first_parent}, climb=strategy)
    assert again.trained == []
    assert [s.genome for s in second.path] == [s.genome for s in first.path] and second.best == first.best
    assert [list(r.outcomes) for r in rungs] == [list(r.outcomes) for r in first_rungs]  # the same order of arrival


def test_with_a_barrier_each_rung_promotes_the_best_third_of_the_batch_and_a_rerun_retraces_it(tracking_uri):
    """search.fidelity.mode=halving: the same scheduler, its rounds synchronous (the population, then each batch)."""
    store = Store(tracking_uri, "asha")
    first_parent, first_rungs, first = _search(store, SimulatedWorkers(3), set(), climb=True, barrier=True)
    population = list(first_rungs[0].outcomes)[:9]  # the first round: the population, all at rung 0
    top = sorted(population, key=lambda g: (-truth(g), str(g)))[:3]
    assert set(top) <= set(first_rungs[1].outcomes)  # its best third went up to rung 1
    assert set(first_rungs[2].outcomes) <= set(first_rungs[1].outcomes) <= set(first_rungs[0].outcomes)
    again = SimulatedWorkers(3)
    _, rungs, second = _search(store, again, {first_parent}, climb=True, barrier=True)
    assert again.trained == [] and [s.genome for s in second.path] == [s.genome for s in first.path] and second.best == first.best
    assert [set(r.outcomes) for r in rungs] == [set(r.outcomes) for r in first_rungs]  # within a round, order does not matter


def test_an_interrupted_search_resumes_from_the_store_and_trains_each_evaluation_once(tracking_uri):
    store = Store(tracking_uri, "asha")
    interrupted = SimulatedWorkers(3, fail_after=17)
    with pytest.raises(KeyboardInterrupt):
        _search(store, interrupted, set(), climb=True)
    killed = store._search("attributes.status = 'KILLED'")
    assert len(killed) == 3  # the evaluations in flight, marked KILLED
    first = {store._search("tags.`fmnas.role` = 'search'")[0].info.run_id}
    resumed = SimulatedWorkers(3)
    _, _, result = _search(store, resumed, first, climb=True)
    # The 17 finished evaluations are replayed, not trained; the count budget (40) holds across both attempts.
    assert len(resumed.trained) == 40 - 17 and not set(resumed.trained) & set(interrupted.trained)
    first |= {r.info.run_id for r in store._search("tags.`fmnas.role` = 'search'")}
    again = SimulatedWorkers(3)
    _, _, rerun = _search(store, again, first, climb=True)
    assert again.trained == [] and [s.genome for s in rerun.path] == [s.genome for s in result.path]


@pytest.mark.slow  # 480 evaluations through a real SQLite store
def test_the_asynchronous_climber_moves_and_beats_random_search_on_a_smooth_landscape(tracking_uri, tmp_path):
    climbs, randoms, moves = [], [], []
    for seed in range(4):
        s1 = Store(f"sqlite:///{tmp_path / f'c{seed}.db'}", "asha")
        _, _, c = _search(s1, SimulatedWorkers(2), set(), count=60, seed=seed, climb=True)
        s2 = Store(f"sqlite:///{tmp_path / f'r{seed}.db'}", "asha")
        _, _, r = _search(s2, SimulatedWorkers(2), set(), count=60, seed=seed)
        climbs.append(c.best_fitness)
        randoms.append(r.best_fitness)
        moves.append(sum(s.move in ("improve", "optimum") for s in c.path))
    assert np.mean(climbs) > np.mean(randoms), (climbs, randoms)
    assert min(moves) >= 2 and all(math.isfinite(f) for f in climbs)
