"""The search objective: genomes in, fitness values out, within an allowance of new evaluations and time.

Free: genomes this search has already seen, and results another search stored. Counted: genomes
trained now, and results an earlier attempt of this same search stored (a rerun or a resume after
a crash), so that a rerun retraces the same path and trains nothing. The evaluator behind it
decides train-or-reuse; this module only decides what counts and what is affordable.

Multi-fidelity: one `SearchObjective` per rung (budget), and `scheduler.Halving` over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Sequence

from fmnas_jax.budget import TimeBudget
from fmnas_jax.cost import CostModel, Sample
from fmnas_jax.data import data_info
from fmnas_jax.evaluator import Evaluator, Outcome
from fmnas_jax.genome import Genome, train_flops_per_image
from fmnas_jax.search.fitness import FitnessConfig, fitness
from fmnas_jax.train import TrainConfig


def images_per_evaluation(trainer: TrainConfig, n_train: int) -> int:
    """Images an evaluation with this trainer on `n_train` images trains on (epochs x full batches)."""
    return trainer.epochs * (n_train // trainer.batch_size) * trainer.batch_size


class Allowance:
    """What a search may still spend: a count of new evaluations and/or wall-clock seconds.

    The time check predicts each evaluation's cost from its genome (`CostModel`) and spreads it over
    the backend's parallel slots; `reserve()` is time kept back for what follows (the final retrain).
    While the cost model still runs on its priors (measured on another machine, easily 3x off), a
    synchronous round trains at most one evaluation per slot (`round_limit`): an admitted evaluation is
    never cancelled, so a whole population admitted on a wrong prior would overrun the budget.
    """

    def __init__(
        self,
        count: int | None = None,
        budget: TimeBudget | None = None,
        cost: CostModel | None = None,
        parallelism: int = 1,
        reserve: Callable[[], float] = lambda: 0.0,
        replay_only: bool = False,
    ) -> None:
        self.count, self.cost, self.parallelism, self.reserve = count, cost or CostModel(), parallelism, reserve
        self.budget = budget if budget is not None else TimeBudget(None)  # the job's clock: what is left of search.time_budget
        self.replay_only = replay_only  # a finished search run again: only stored results, nothing trained
        self.spent = 0  # new evaluations admitted
        self.pending = 0.0  # predicted seconds of the batch being admitted
        self.exhausted = False

    def allow(self, more: int) -> None:
        """Let the search pay for `more` new evaluations beyond those counted so far."""
        self.count, self.exhausted = self.spent + more, False

    def remaining_seconds(self) -> float:
        return self.budget.left()

    def admit(self, genome: Genome, images: int) -> bool:
        """Whether one more new evaluation of `genome` on `images` images fits; counts it if so."""
        if (self.count is not None and self.spent >= self.count) or (self.replay_only and images > 0):
            self.exhausted = True
            return False
        if self.budget.timed and images > 0:  # a stored result costs no training time
            wall = self.cost.seconds(genome, images) / self.parallelism
            if self.pending + wall + self.reserve() > self.remaining_seconds():
                self.exhausted = True
                return False
            self.pending += wall
        self.spent += 1
        return True

    def round_limit(self) -> int | None:
        """New trainings one synchronous round may admit: the slots while the time check rests on priors, else no limit."""
        return self.parallelism if self.budget.timed and not self.cost.calibrated else None

    def batch_done(self) -> None:
        """The admitted batch has run: its time is now on the clock."""
        self.pending = 0.0


class SearchObjective:
    """Fitness of genomes at one budget, for strategies (see fmnas_jax.search.base.Objective)."""

    def __init__(
        self,
        evaluator: Evaluator,
        fitness_cfg: FitnessConfig,
        own_searches: Container[str],
        allowance: Allowance | None = None,
        n_train: int = 55_000,
        on_counted: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.evaluator, self.fitness_cfg, self.own_searches = evaluator, fitness_cfg, own_searches
        self.allowance = allowance or Allowance()
        self.images = images_per_evaluation(evaluator.spec.trainer, n_train)
        self.on_counted = on_counted
        self.outcomes: dict[Genome, Outcome] = {}  # in first-seen order

    @property
    def exhausted(self) -> bool:
        return self.allowance.exhausted

    @property
    def parallelism(self) -> int:
        """How many genomes one call can evaluate at once (strategies may batch by it)."""
        return self.evaluator.backend.parallelism

    def record(self, o: Outcome) -> None:
        """Count a stored result as one of this search's outcomes (the table climber's rows), unless it has one already."""
        self.outcomes.setdefault(o.genome, o)

    def completed(self, o: Outcome, counted: bool) -> None:
        """An outcome arrived (synchronous rounds or the asynchronous scheduler): a new one teaches the cost model
        and gets on its run the fitness this search ranks it by; a counted one is reported to `on_counted`."""
        if not o.reused and "wall_seconds" in o.metrics:
            self.allowance.cost.add(Sample(o.genome, int(o.metric("images_trained")), o.metric("wall_seconds"), o.metric("train_seconds")))
        self.evaluator.record_fitness(o, self.fitness_of(o))
        if counted and self.on_counted is not None:
            self.on_counted(o)

    def fitness_of(self, o: Outcome) -> float:
        if o.status != "FINISHED":
            return -math.inf  # failed (e.g. diverged): the worst fitness, and the search goes on
        flops = train_flops_per_image(o.genome, data_info(self.evaluator.spec.data).image) if self.fitness_cfg.compute_weight else None
        return fitness(self.fitness_cfg, o.metric(self.fitness_cfg.metric), int(o.metric("param_count")), flops)

    def __call__(self, genomes: Sequence[Genome]) -> list[float]:
        counted: set[Genome] = set()
        trained, deferred = 0, False  # this round's new trainings; whether the round limit held one back

        def admit(g: Genome, stored: Outcome | None) -> bool:
            nonlocal trained, deferred
            if stored is not None and stored.parent_run_id not in self.own_searches:
                return True  # another search's result: free
            limit = self.allowance.round_limit()
            if stored is None and limit is not None and trained >= limit:
                deferred = True  # to a later round, once the finished ones have taught the cost model
                return False
            if not self.allowance.admit(g, 0 if stored is not None else self.images):
                return False
            counted.add(g)
            trained += stored is None
            return True

        try:
            while True:
                trained, deferred = 0, False
                todo = [g for g in genomes if g not in self.outcomes]  # what no earlier call or round finished
                self.outcomes |= self.evaluator.evaluate_many(todo, admit, lambda o: self.completed(o, o.genome in counted))
                self.allowance.batch_done()
                if not deferred or self.allowance.exhausted:
                    break
        finally:
            self.allowance.batch_done()
        return [self.fitness_of(self.outcomes[g]) if g in self.outcomes else -math.inf for g in genomes]
