"""Successive halving over rungs of growing budget, one scheduler in two modes (`search.fidelity.mode`).

Every (genome, rung) is an ordinary evaluation of that rung's `SearchObjective`, with its own budget key:
looked up in the store first, counted against the search's allowance, stored, reused and resumed like any
other. One rule ranks a rung (fitness, then the genome's text on a tie: `Halving.ranked`) and one score is
told to strategies (`Halving.score`): a genome's fitness at the highest rung it reached, RUNG_PENALTY below
each rung above it, so strategies compare full-budget results with each other, never a cheap one with an
expensive one. The modes differ only in the barrier:

- `halving` (with a barrier; `Halving.__call__`, an objective strategies call with a batch): every genome
  of the batch at rung 0, then the best ceil(n/eta) of the batch at rung 1, and so on up to the top.
- `asha` (asynchronous, no barrier; Li et al., 2020; `Halving.run`, which drives an ask/tell strategy):
  whenever a worker slot is free the scheduler starts, in this order, a promotion (the best genome of a rung
  that ranks in the top floor(n/eta) of everything that rung has finished so far and has not gone up yet,
  highest rung first), else a new genome the strategy asks for, at rung 0. No slot waits for the slowest
  genome of a batch.

Asynchronously, a result another search stored is free and taken at once. A result an earlier attempt of
this same search stored (a rerun, or a resume after kill -9) holds a slot like the evaluation it replaces
and is taken in the order its run ended, before any live result: the scheduler then makes the decisions it
made in that attempt, so a rerun retraces the path and trains nothing it has. A genome another live process
is training is waited for (polled), and trained here if that process gives it up. With the barrier, the
same holds by construction: each rung's batch is looked up before anything is trained.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fmnas_jax.backends import Backend
from fmnas_jax.evaluator import Outcome, eval_key
from fmnas_jax.genome import Genome
from fmnas_jax.objective import SearchObjective
from fmnas_jax.search.base import ClimbResult, Strategy
from fmnas_jax.search.fitness import RUNG_PENALTY

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


class Halving:
    """Successive halving over `rungs` (cheapest first, the last the search's own budget): `__call__` with a barrier,
    `run` without one (on `backend`'s slots, which `run` needs)."""

    def __init__(self, rungs: Sequence[SearchObjective], eta: int, backend: Backend | None = None, poll_seconds: float = 2.0) -> None:
        if len(rungs) < 1 or eta < 2:
            raise ValueError(f"successive halving needs at least one rung and eta >= 2, got {len(rungs)} rungs and eta {eta}")
        self.rungs, self.eta, self.backend, self.poll_seconds = list(rungs), eta, backend, poll_seconds
        self.slots = max(1, backend.parallelism) if backend is not None else 1
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
        """No more new genomes fit: the allowance refused one (at rung 0 with the barrier; any new one without)."""
        return self._closed or self.rungs[0].exhausted

    @property
    def parallelism(self) -> int:
        """With the barrier, ask for this many at once: after halving, the full-budget rung still fills the backend."""
        return self.top.parallelism * self.eta ** (len(self.rungs) - 1)

    def score(self, genome: Genome) -> float:
        """The genome's fitness at the highest rung it reached, pushed RUNG_PENALTY below each rung above it (-inf: none)."""
        for r in range(len(self.rungs) - 1, -1, -1):
            o = self.rungs[r].outcomes.get(genome)
            if o is not None:
                return self.rungs[r].fitness_of(o) - RUNG_PENALTY * (len(self.rungs) - 1 - r)
        return -math.inf

    def ranked(self, r: int, genomes: Iterable[Genome]) -> list[Genome]:
        """Those of `genomes` with a finite fitness at rung r, best first (ties: by the genome's text)."""
        rung = self.rungs[r]
        fit = {g: rung.fitness_of(rung.outcomes[g]) for g in genomes if g in rung.outcomes}
        return sorted((g for g, f in fit.items() if math.isfinite(f)), key=lambda g: (-fit[g], str(g)))

    def utilisation(self) -> float:
        """Live evaluations' slot-seconds over the slots' wall-clock seconds since `run` started."""
        return self._busy_seconds / max(self.slots * (time.monotonic() - self._started), 1e-9)

    # -- with a barrier ---------------------------------------------------------------

    def __call__(self, genomes: Sequence[Genome]) -> list[float]:
        """One round: the batch at rung 0, the best ceil(n/eta) of it at the next rung, and so on; their scores."""
        alive = list(dict.fromkeys(genomes))
        for r, rung in enumerate(self.rungs):
            rung(alive)
            if r == len(self.rungs) - 1:
                break
            alive = self.ranked(r, alive)[: max(1, math.ceil(len(alive) / self.eta))]
            if not alive:
                break
        return [self.score(g) for g in genomes]

    # -- without a barrier (ASHA) --------------------------------------------------------

    def run(self, strategy: Strategy) -> ClimbResult:
        """Evaluate what the strategy asks for until it is done or the allowance is spent; the strategy's result."""
        if self.backend is None:
            raise ValueError("asynchronous halving needs the backend whose slots it fills")
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
            k = len(self.rungs[r].outcomes) // self.eta
            for g in self.ranked(r, self.rungs[r].outcomes)[:k]:
                job = (g, r + 1)
                if job not in self._launched and job not in self._unaffordable:
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
