"""The time budget's rules against a clock the test sets: what is left, what earlier attempts are charged, what the
search admits, what the retrain may train and when it must end. Nothing is trained and nothing waits.

(The real wall clock: test_reliability.py's time-budgeted searches.)"""

import math

import numpy as np

from fmnas_jax import SearchSpace
from fmnas_jax.budget import AFTER_RETRAIN_SECONDS, TimeBudget
from fmnas_jax.cost import CostModel, Sample
from fmnas_jax.genome import sample_population
from fmnas_jax.jobs.attempts import OwnSearches, earlier_attempts
from fmnas_jax.objective import Allowance
from fmnas_jax.store import Store


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


GENOME = sample_population(SearchSpace(filters=(4,), kernel_sizes=(1, 2)), 1, np.random.default_rng(0))[0]
COST = CostModel([Sample(GENOME, 1000, 10.0, 8.0)] * 6 + [Sample(GENOME, 2000, 18.0, 16.0)] * 6)  # 2 s + 8 ms per image


def test_an_untimed_budget_never_ends():
    budget = TimeBudget(None, clock=Clock())
    assert not budget.timed and budget.left() == math.inf and budget.end() is None and budget.retrain_deadline() is None
    assert budget.retrain_epochs(40, epoch_seconds=1e9, overhead=1e9) == 40 and budget.retrain_cap(0.5) == 0.0


def test_the_budget_runs_from_the_start_and_earlier_attempts_are_charged():
    clock = Clock()
    budget = TimeBudget(600, clock=clock)  # started now: start-up before it is not charged
    clock.now += 100
    assert budget.elapsed() == 100 and budget.left() == 500
    budget.charge(150)  # two earlier attempts spent 100 + 50 s
    budget.charge(0)
    assert budget.left() == 350 and budget.end() == 1000 + 600 - 150
    assert budget.elapsed() == 100  # what this attempt charges the next one: its own time only
    assert budget.retrain_deadline() == budget.end() - AFTER_RETRAIN_SECONDS and budget.retrain_cap(0.5) == 300
    clock.now += 400
    assert budget.left() == -50  # past its end


def test_the_retrain_trains_the_epochs_that_fit_what_is_left_and_at_least_one():
    clock = Clock()
    budget = TimeBudget(600, clock=clock)
    clock.now += 400  # 200 s left: 170 before the report, 160 after 10 s of compiling, 21 s an epoch with the margin
    assert budget.retrain_epochs(40, epoch_seconds=20, overhead=10) == 160 // 21
    assert budget.retrain_epochs(5, epoch_seconds=20, overhead=10) == 5  # never more than planned
    assert budget.retrain_epochs(40, epoch_seconds=20, overhead=10, speedup=2.0) == (170 * 2 - 10) // 21  # the retrain uses every core
    clock.now += 190  # 10 s left: less than the report needs
    assert budget.retrain_epochs(40, epoch_seconds=20, overhead=10) == 1


def test_the_search_admits_what_fits_what_is_left_after_earlier_attempts_and_the_reserve():
    clock = Clock()
    budget = TimeBudget(100, clock=clock)
    clock.now += 10
    budget.charge(40)  # 50 s left
    allow = Allowance(None, budget, COST, parallelism=1, reserve=lambda: 5.0)
    assert allow.remaining_seconds() == budget.left() == 50
    admitted = [allow.admit(GENOME, 1000) for _ in range(5)]  # 10 s each: four fit before the 5-s reserve
    assert admitted == [True, True, True, True, False] and allow.exhausted
    allow.batch_done()
    clock.now += 40  # the batch ran: 10 s left, 5 reserved
    allow.allow(10)
    assert not allow.admit(GENOME, 1000) and allow.admit(GENOME, 0)  # a stored result costs no time
    replay = Allowance(None, TimeBudget(1e9, clock=clock), COST, replay_only=True)  # a finished search run again: replays, trains nothing
    assert not replay.admit(GENOME, 1000) and replay.admit(GENOME, 0)


def test_what_earlier_attempts_spent_is_read_from_the_store(tracking_uri):
    store = Store(tracking_uri, "budget")
    first, second, other = (store.start_run(n, "search", {"search_key": k}) for n, k in (("a", "k"), ("b", "k"), ("c", "other")))
    store.log(first, metrics={"elapsed_seconds": 70.0}, step=3)  # killed: its last logged elapsed time counts
    store.end_run(first, "KILLED")
    store.log(other, metrics={"elapsed_seconds": 500.0})  # another search's time is not this one's
    store.end_run(other, "FINISHED")
    now = store.start_run("now", "search", {"search_key": "k"})
    own = OwnSearches(store, "k", {first, second, now})
    assert earlier_attempts(store, own, now) == (70.0, False)  # the second attempt logged nothing yet: 0 s
    store.log(second, metrics={"elapsed_seconds": 30.0})
    store.end_run(second, "FINISHED")
    assert earlier_attempts(store, own, now) == (100.0, True)  # one of them finished: the rerun only replays
