"""Hill climbing in genome space with random restarts (first or steepest improvement), in ask/tell form.

A climb starts from an origin (the best of the population, or a random genome after a restart), asks
the origin's neighbours in a random order and moves: with `first`, to the first candidate told better
than the current point; with `steepest`, to the best of the whole neighbourhood. Results of the
previous point's candidates that arrive after a move do not move the climb (they still count for the
best genome found: the result is the best genome told, whether or not a climb moved to it).
A neighbourhood with nothing better is a local optimum: restart, until `patience`
restarts in a row bring no improvement or `max_restarts` is reached.

`eager` (the asynchronous scheduler): candidates are asked before the current point's own result is
known, so a free worker always gets a genome, and the climb moves to any genome asked in this climb
(the population's too, in the first) whose result beats the current point's, whenever it arrives: with
rungs, results come back rung by rung, and the one that reaches the top rung first is where to climb on.

`min_gain` > 0: a candidate moves the climb only when it beats the current point by more than that (in fitness, e.g.
0.008 = the top rung's 0.8 points of seed noise); gains inside it end the climb at a local optimum, and it restarts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, neighbours, random_genome
from fmnas_jax.search.base import ClimbResult, Objective, Proposals, SearchConfig, Step, Strategy, drive

MOVES = ("first", "steepest")


@dataclass(frozen=True)
class HillClimbConfig(SearchConfig):
    """search=hillclimb: one-gene moves, first or steepest improvement, random restarts, a least gain that moves it."""

    strategy: str = "hillclimb"
    move: str = "first"  # first | steepest improvement
    patience: int = 2  # stop after this many restarts in a row without improvement
    max_restarts: int = 10
    # The least fitness gain that moves the climb (0: any gain). A gain inside the top rung's seed noise is luck as
    # often as progress; with a threshold the climb stops at such a point and restarts instead of chasing noise.
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.move not in MOVES:
            raise ValueError(f"search.move {self.move!r} is not one of {list(MOVES)}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"search.min_gain {self.min_gain} must be >= 0 and < 1 (a gain in fitness, accuracy as a fraction)")
        if self.patience < 1 or self.max_restarts < 0:
            raise ValueError(f"search.patience {self.patience} must be >= 1 and search.max_restarts {self.max_restarts} >= 0")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        return HillClimber(space, rng, self, start=given.start, population=given.population, eager=given.eager)


class HillClimber:
    """Hill climbing with restarts as a Strategy (ask/tell); see the module docstring."""

    def __init__(
        self,
        space: SearchSpace,
        rng: np.random.Generator,
        cfg: HillClimbConfig,
        start: Genome | None = None,
        population: list[Genome] | tuple[Genome, ...] = (),
        eager: bool = False,
    ) -> None:
        self.space, self.rng, self.cfg, self.eager = space, rng, cfg, eager
        self.known: dict[Genome, float] = {}
        self.path: list[Step] = []
        self._population, self._members = list(population), set(population)
        self._start = start
        self._restart, self._stale, self._done = 0, 0, False
        self._best: Genome | None = None
        self._best_f = -math.inf
        self._current: Genome | None = None
        self._f: float | None = None
        self._climb: list[Step] = []
        self._queue: list[Genome] = []
        self._asked: set[Genome] = set()  # candidates of the current point not told yet
        self._climb_asked: set[Genome] = set()  # every genome this climb asked (eager: any of them may move it)
        self._scores: dict[Genome, float] = {}  # candidates of the current point told (steepest)

    @property
    def done(self) -> bool:
        return self._done

    # -- ask ----------------------------------------------------------------------

    def ask(self) -> Genome | None:
        if self._done:
            return None
        if self._population:
            return self._population.pop(0)
        if self._current is None and not self._begin():
            return None
        if self._f is None and self._current not in self.known:
            if self._current not in self._asked:
                self._asked.add(self._current)
                self._climb_asked.add(self._current)
                return self._current  # the origin itself
            if not self.eager:
                return None
        return self._candidate()

    def _begin(self) -> bool:
        """Start a climb at its origin; False while the population's results are still awaited."""
        if self._restart == 0 and self._start is not None:
            origin = self._start
        elif self._restart == 0 and self._members:
            told = [g for g in self._members if g in self.known]
            if not told or (not self.eager and len(told) < len(self._members)):
                return False
            origin = max(sorted(told, key=str), key=lambda g: self.known[g])
        else:
            origin = random_genome(self.space, self.rng)
        self._current, self._f = origin, self.known.get(origin)
        self._climb = []
        self._climb_asked = set(self._members) if self._restart == 0 else set()
        if self._f is not None:
            self._record(origin, self._f, "start")
        nbrs = neighbours(origin, self.space)
        self._queue = [nbrs[i] for i in self.rng.permutation(len(nbrs))]
        self._asked, self._scores = set(), {}
        return True

    def _candidate(self) -> Genome | None:
        while self._queue:
            g = self._queue.pop(0)
            if g in self.known:  # told before (the population, an earlier climb): no need to ask
                self._consider(g, self.known[g], candidate=True)
                if self._current is None:
                    return self.ask()
                continue
            self._asked.add(g)
            self._climb_asked.add(g)
            return g
        if self._asked - {self._current} or self._f is None:
            return None  # wait for the neighbourhood's results
        if self.cfg.move == "steepest" and self._scores:
            g = max(sorted(self._scores, key=str), key=lambda c: self._scores[c])
            if self._beats(self._scores[g]):
                self._move(g, self._scores[g])
                return self.ask()
        self._end("optimum")
        return self.ask()

    # -- tell ---------------------------------------------------------------------

    def tell(self, genome: Genome, fitness: float) -> None:
        self.known[genome] = max(self.known.get(genome, -math.inf), fitness)
        fitness = self.known[genome]
        if genome == self._current:
            first = self._f is None
            self._f = fitness
            self._asked.discard(genome)
            if first:
                self._record(genome, fitness, "start")
            return
        if genome in self._asked:
            self._asked.discard(genome)
            self._consider(genome, fitness, candidate=True)
        elif self.eager and genome in self._climb_asked and self._current is not None:
            self._consider(genome, fitness, candidate=False)  # an earlier point's candidate (or a population member) that beats it

    def _consider(self, genome: Genome, fitness: float, candidate: bool) -> None:
        if candidate and self.cfg.move == "steepest":
            self._scores[genome] = fitness
        elif self._f is not None and self._beats(fitness):
            self._move(genome, fitness)

    def _beats(self, fitness: float) -> bool:
        """Whether a candidate's fitness moves the climb: above the current point's by more than `min_gain`."""
        return fitness > self._f + self.cfg.min_gain

    def _move(self, genome: Genome, fitness: float) -> None:
        self._current, self._f = genome, fitness
        self._record(genome, fitness, "improve")
        nbrs = neighbours(genome, self.space)
        self._queue = [nbrs[i] for i in self.rng.permutation(len(nbrs))]
        self._asked, self._scores = set(), {}

    def _record(self, genome: Genome, fitness: float, move: str) -> None:
        step = Step(self._restart, len(self._climb), genome, fitness, move)
        self._climb.append(step)
        self.path.append(step)

    def _end(self, why: str) -> None:
        """End the current climb (a local optimum, or the budget), then restart or finish."""
        if self._current is not None and self._f is not None:
            self._record(self._current, self._f, why)
        top = max((s.fitness for s in self._climb), default=-math.inf)
        if top > self._best_f:
            self._best, self._best_f, self._stale = max(self._climb, key=lambda s: s.fitness).genome, top, 0
        else:
            self._stale += 1
        self._current, self._f, self._climb = None, None, []
        self._restart += 1
        if why != "optimum" or self._stale >= self.cfg.patience or self._restart > self.cfg.max_restarts:
            self._done = True

    def stop(self, why: str) -> None:
        if not self._done:
            self._end(why)
            self._done = True

    def result(self) -> ClimbResult:
        """The best genome told, as random search's: a climb's best point, or a candidate that did not move a climb (a
        gain inside `min_gain`, a result that arrived after its climb moved on or ended), which then closes the path
        as a "best" step."""
        if not self._done:
            self.stop("budget")
        if not self.known:  # nothing told, so no step recorded either
            return ClimbResult(self._start, -math.inf, ())
        told = max(self.known, key=lambda g: self.known[g])  # the first told of equals
        if self._best is not None and self.known[self._best] == self.known[told]:  # every step's genome was told
            return ClimbResult(self._best, self.known[told], tuple(self.path))
        restart, step = (self.path[-1].restart, self.path[-1].step + 1) if self.path else (0, 0)
        return ClimbResult(told, self.known[told], (*self.path, Step(restart, step, told, self.known[told], "best")))


def hill_climb(
    space: SearchSpace, objective: Objective, rng: np.random.Generator, cfg: HillClimbConfig, start: Genome | None = None
) -> ClimbResult:
    """Climb from `start` (or a random genome), restart at random until `patience` restarts bring nothing."""
    return drive(HillClimber(space, rng, cfg, start), objective)
