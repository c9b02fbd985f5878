"""Asynchronous successive halving (ASHA; Li et al., 2020): rungs without a barrier.

Whenever a worker slot is free the scheduler starts, in this order: a promotion (the best genome of a
rung that ranks in the top 1/eta of everything that rung has finished so far and has not gone up yet,
highest rung first), else a new genome the strategy asks for, at rung 0. So no slot waits for the
slowest genome of a batch, as synchronous halving's do at each rung.

Every (genome, rung) is an ordinary evaluation of that rung's `SearchObjective`: looked up in the store
first, counted against the search's allowance, run as an MLflow run by the rung's evaluator. A result
another search stored is free and taken at once. A result an earlier attempt of this same search
stored (a rerun, or a resume after kill -9) holds a slot like the evaluation it replaces and is taken
in the order its run ended, before any live result: the scheduler then makes the decisions it made in
that attempt, so a rerun retraces the path and trains nothing it has. A genome another live process is
training is waited for (polled), and trained here if that process gives it up.

Strategies get one fitness per genome and rung as it arrives: the rung's fitness minus RUNG_PENALTY per
rung below the top (as with synchronous halving), again when the genome reaches a higher rung.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fmnas_jax.backends import Backend
from fmnas_jax.evaluator import Outcome, eval_key
from fmnas_jax.genome import Genome
from fmnas_jax.objective import SearchObjective, rung_score
from fmnas_jax.search.base import ClimbResult, Strategy

log = logging.getLogger("fmnas_jax")


@dataclass
class _Job:
    genome: Genome
    rung: int
    run_id: str | None = None  # a run this process opened (live)
    stored: Outcome | None = None  # an earlier attempt's result, taken in its turn
    elsewhere: str | None = None  # the run id another process is training it under
    started: float = field(default_factory=time.monotonic)
    predicted: float = 0.0  # seconds the cost model gave it when it was admitted


class AsyncHalving:
    """ASHA over `rungs` (cheapest first, the last the search's own budget) on `backend`'s slots."""

    def __init__(self, rungs: Sequence[SearchObjective], eta: int, backend: Backend, poll_seconds: float = 2.0) -> None:
        if len(rungs) < 1 or eta < 2:
            raise ValueError(f"asynchronous halving needs at least one rung and eta >= 2, got {len(rungs)} rungs and eta {eta}")
        self.rungs, self.eta, self.backend, self.poll_seconds = list(rungs), eta, backend, poll_seconds
        self.slots = max(1, backend.parallelism)
        self._jobs: list[_Job] = []
        self._launched: set[tuple[Genome, int]] = set()
        self._unaffordable: set[tuple[Genome, int]] = set()
        self._closed = False  # no more new genomes: the allowance refused one
        self._busy_seconds = 0.0  # slot-seconds of live evaluations (utilisation)
        self._started = time.monotonic()
        self._claimed: dict[int, tuple[float, dict[str, str]]] = {}  # rung -> (when, eval_key -> run id) of others' runs

    @property
    def top(self) -> SearchObjective:
        return self.rungs[-1]

    @property
    def exhausted(self) -> bool:
        return self._closed

    def score(self, genome: Genome) -> float:
        return rung_score(self.rungs, genome)

    def utilisation(self) -> float:
        """Live evaluations' slot-seconds over the slots' wall-clock seconds since the scheduler started."""
        return self._busy_seconds / max(self.slots * (time.monotonic() - self._started), 1e-9)

    # -- the loop -----------------------------------------------------------------

    def run(self, strategy: Strategy) -> ClimbResult:
        """Evaluate what the strategy asks for until it is done or the allowance is spent; the strategy's result."""
        self._started = time.monotonic()
        try:
            while True:
                self._fill(strategy)
                if not self._jobs:
                    break
                self._complete_one(strategy)
        except BaseException:
            for job in self._jobs:
                if job.run_id is not None:
                    self.rungs[job.rung].evaluator.kill(job.run_id)
            raise
        if self._closed and not strategy.done:
            strategy.stop("budget")
        return strategy.result()

    def _fill(self, strategy: Strategy) -> None:
        while len(self._jobs) < self.slots:
            job = self._promotion()
            if job is None:
                if self._closed or strategy.done:
                    return
                genome = strategy.ask()
                if genome is None:
                    return
                if (genome, 0) in self._launched:  # asked again: it has its result (or will)
                    if genome in self.rungs[0].outcomes:
                        strategy.tell(genome, self.score(genome))
                    continue
                job = (genome, 0)
            if not self._launch(*job, strategy) and job[1] == 0:
                self._closed = True  # the next genome does not fit the allowance: ask for no more

    def _promotion(self) -> tuple[Genome, int] | None:
        """The next (genome, rung) to promote to, or None."""
        for r in range(len(self.rungs) - 2, -1, -1):
            rung = self.rungs[r]
            k = len(rung.outcomes) // self.eta
            if not k:
                continue
            ranked = sorted(rung.outcomes.values(), key=lambda o: (-rung.fitness_of(o), str(o.genome)))
            for o in ranked[:k]:
                job = (o.genome, r + 1)
                if math.isfinite(rung.fitness_of(o)) and job not in self._launched and job not in self._unaffordable:
                    return job
        return None

    def _launch(self, genome: Genome, r: int, strategy: Strategy) -> bool:
        """Start (genome, rung r): take a stored result, wait for another process, or train; False if it does not fit."""
        rung = self.rungs[r]
        stored = rung.evaluator.lookup(genome)
        if stored is not None and stored.parent_run_id not in rung.own_searches:
            self._launched.add((genome, r))
            rung.evaluator.reused_one(stored)
            self._done(r, stored, strategy, counted=False)  # another search's result: free, and at once
            return True
        # What is still to run of the evaluations in flight, spread over the slots, as a synchronous batch's would be.
        now = time.monotonic()
        rung.allowance.pending = sum(max(0.0, j.predicted - (now - j.started)) for j in self._jobs if j.run_id) / self.slots
        if not rung.allowance.admit(genome, 0 if stored is not None else rung.images):
            self._unaffordable.add((genome, r))
            return False
        self._launched.add((genome, r))
        if stored is not None:
            rung.evaluator.reused_one(stored)
            self._jobs.append(_Job(genome, r, stored=stored))
            return True
        other = self._others(r).get(eval_key(genome, rung.evaluator.budget))
        if other is not None:
            log.info("waiting for %s (rung %d): another process is training it", genome, r)
            self._jobs.append(_Job(genome, r, elsewhere=other))
            return True
        self._train(genome, r)
        return True

    def _others(self, r: int) -> dict[str, str]:
        """This rung's evaluations other live processes are training (read again at most every poll_seconds)."""
        when, claimed = self._claimed.get(r, (-math.inf, {}))
        if time.monotonic() - when > self.poll_seconds:
            claimed = self.rungs[r].evaluator.running_elsewhere()
            self._claimed[r] = (time.monotonic(), claimed)
        return claimed

    def _train(self, genome: Genome, r: int) -> None:
        rung = self.rungs[r]
        run_id = rung.evaluator.start(genome)
        on_epoch = rung.evaluator.epoch_logger(genome, run_id) if self.backend.streams_epochs else None
        self.backend.submit((genome, r, run_id), genome, rung.evaluator.spec, on_epoch)
        self._jobs.append(_Job(genome, r, run_id=run_id, predicted=rung.allowance.cost.seconds(genome, rung.images)))

    def _complete_one(self, strategy: Strategy) -> None:
        """Take the next finished evaluation: stored ones first (in the order their runs ended), then live or awaited ones."""
        stored = [j for j in self._jobs if j.stored is not None]
        if stored:
            job = min(stored, key=lambda j: (j.stored.end_time, str(j.genome)))
            self._jobs.remove(job)
            self._done(job.rung, job.stored, strategy, counted=True)
            return
        waiting = [j for j in self._jobs if j.elsewhere is not None]
        live = [j for j in self._jobs if j.run_id is not None]
        result = self.backend.next_result(timeout=self.poll_seconds if waiting else None) if live else None
        if result is not None:
            (genome, r, run_id), res = result
            job = next(j for j in live if j.run_id == run_id)
            self._jobs.remove(job)
            self._busy_seconds += time.monotonic() - job.started
            self._done(r, self.rungs[r].evaluator.finish(genome, run_id, res), strategy, counted=True)
            return
        if not live:
            time.sleep(self.poll_seconds)
        self._poll(waiting, strategy)

    def _poll(self, waiting: list[_Job], strategy: Strategy) -> None:
        """Evaluations another process trains: taken when stored, trained here when it gave them up."""
        for job in waiting:
            evaluator = self.rungs[job.rung].evaluator
            found = evaluator.lookup(job.genome)
            if found is not None:
                self._jobs.remove(job)
                evaluator.reused_one(found)
                self._done(job.rung, found, strategy, counted=True)
            elif not evaluator.is_live(job.elsewhere):
                self._jobs.remove(job)
                self._train(job.genome, job.rung)  # its owner gave it up: train it here

    def _done(self, r: int, outcome: Outcome, strategy: Strategy, counted: bool) -> None:
        rung = self.rungs[r]
        rung.outcomes[outcome.genome] = outcome
        rung.completed(outcome, counted)
        strategy.tell(outcome.genome, self.score(outcome.genome))
