"""The search job: population -> strategy -> the winner retrained -> report, under one parent MLflow run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fmnas_jax.backends import Backend, EvalSpec, InProcess, choose_backend, cpu_workers, opened
from fmnas_jax.budget import TimeBudget
from fmnas_jax.config import AppConfig
from fmnas_jax.cost import WORKERS_OVER_ONE_PROCESS, CostModel, Sample
from fmnas_jax.evaluator import Evaluator, Outcome, budget_key, describe_budget
from fmnas_jax.genome import Genome, SearchSpace, genome_in, sample_population
from fmnas_jax.jobs.attempts import OwnSearches, earlier_attempts, earlier_final_epochs
from fmnas_jax.jobs.common import describe_data, open_store
from fmnas_jax.jobs.search_report import log_counts, report
from fmnas_jax.objective import Allowance, SearchObjective, images_per_evaluation
from fmnas_jax.progress import EpochBar, SearchProgress
from fmnas_jax.report import Card
from fmnas_jax.scheduler import Halving
from fmnas_jax.search.base import ClimbResult, Proposals, drive
from fmnas_jax.store import Store, flatten, host_name

log = logging.getLogger("fmnas_jax")


def search_key(cfg: AppConfig) -> str:
    """Hash of what determines a search's path: space, strategy, fitness, budget and seeds."""
    blob: dict[str, Any] = {k: asdict(getattr(cfg, k)) for k in ("search_space", "search", "fitness")}
    blob["search_space"].pop("image")  # the data's shape: the budget key holds the data's digest
    blob["budget"] = budget_key(EvalSpec(cfg.trainer, cfg.data, cfg.seed))
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rung_specs(cfg: AppConfig) -> list[EvalSpec]:
    """The evaluation budgets of the search, cheapest first; the last is trainer.* on data.*."""
    top = EvalSpec(cfg.trainer, cfg.data, cfg.seed)
    if cfg.search.fidelity.mode == "none":
        return [top]
    lower = [
        EvalSpec(replace(cfg.trainer, epochs=r.epochs), replace(cfg.data, train_size=r.train_size), cfg.seed, test=False)
        for r in cfg.search.fidelity.rungs  # never reported: skip the 10,000 test images
    ]
    return [*lower, top]


def run_search(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Population -> strategy -> retrain the winner -> report; everything logged under one parent run."""
    sc = cfg.search
    budget = TimeBudget(sc.time_budget_seconds)  # start-up excluded: the budget starts here
    store = open_store(cfg)
    specs = rung_specs(cfg)
    budgets = " | ".join(f"rung {i}: {describe_budget(s.trainer, s.data)}" for i, s in enumerate(specs)) if len(specs) > 1 else \
        describe_budget(cfg.trainer, cfg.data)  # fmt: skip
    limit = sc.describe_limits()
    log.info("search: %s, %s, data %s; each evaluation: %s", sc.strategy, limit, describe_data(cfg.data), budgets)
    log.info("change it with e.g. search.time_budget=30m search.population_size=40 trainer.epochs=5 data.train_size=null")
    key = search_key(cfg)
    own = store.run_ids("search", "search_key", key)
    if own:
        log.info("this search (search_key %s) ran %d time(s) before: its stored evaluations are reused", key, len(own))
    parent = store.start_run(f"s{sc.seed} {sc.strategy} search", "search", {"search.strategy": sc.strategy, "search_key": key})
    store.log(
        parent,
        params=flatten("", {k: asdict(getattr(cfg, k)) for k in ("search", "fitness", "trainer", "data", "final")}) | {"seed": cfg.seed},
    )
    store.log_text(parent, config_yaml, "config.yaml")
    store.describe(parent, f"A {sc.strategy} search, seed {sc.seed}, {limit}.\n\n"
                           f"Evaluations: {budgets}.\n\nRunning; the winner and its result card appear here when it ends.")  # fmt: skip
    try:
        with (
            store.system_metrics(parent),
            opened(choose_backend(cfg.backend, cfg.cache_dir)) as backend,
        ):
            log.info("evaluation path: %s", backend.description)
            card = _search(cfg, store, parent, OwnSearches(store, key, own | {parent}), backend, specs, budget, out_dir)
    except BaseException as e:
        store.end_run_on_the_way_out(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise
    store.end_run(parent, "FINISHED")
    return card


@dataclass
class _Retrain:
    """The winner's retrain as the search plans for it: its spec, the cost model, and how much faster than one
    worker's evaluation it runs (in-process on every core: on a worker pool, faster than one worker; a Ray cluster's
    other nodes do not speed it up here)."""

    spec: EvalSpec
    cost: CostModel
    speedup: float

    def seconds(self, genome: Genome) -> float:
        return self.cost.seconds(genome, images_per_evaluation(self.spec.trainer, self.spec.data.n_train)) / self.speedup


def _search(
    cfg: AppConfig, store: Store, parent: str, own: OwnSearches, backend: Backend, specs: list[EvalSpec], budget: TimeBudget, out_dir: Path
) -> Card:
    speedup = min(backend.parallelism, cpu_workers()) / WORKERS_OVER_ONE_PROCESS if backend.separate_processes else 1.0
    final_spec = EvalSpec(cfg.final.trainer(cfg.trainer), cfg.final.data(cfg.data), cfg.seed, keep_variables=True)
    retrain = _Retrain(final_spec, CostModel(_samples(store, cfg.data.result_settings().get("data")), cfg.search_space.image), speedup)
    # A time budget holds across attempts: what earlier attempts of this search spent is charged, and a rerun of a
    # finished search only replays what it stored (trains nothing, so it ends where it ended).
    spent, finished = earlier_attempts(store, own, parent)
    if spent or finished:
        log.info("earlier attempts of this search spent %.0f s of its time budget%s", spent, "; it finished: replaying it" * finished)
    budget.charge(spent)
    allowance = Allowance(None, budget, retrain.cost, backend.parallelism, replay_only=finished)
    progress = SearchProgress(cfg, store, parent, budget)
    with EpochBar(cfg.trainer.epochs, cfg.progress and backend.streams_epochs) as epochs:
        for r, spec in enumerate(specs):
            ev = Evaluator(store, spec, backend, parent, epochs.update, rung=r if len(specs) > 1 else None)
            progress.rungs.append(SearchObjective(ev, cfg.fitness, own, allowance, spec.data.n_train, on_counted=progress.counted(r)))
        rungs = progress.rungs
        # The search keeps back the leader's predicted retrain, but never more than search.final_share of the budget:
        # the retrain then trains the epochs that fit (_fit_final).
        cap = budget.retrain_cap(cfg.search.final_share)
        allowance.reserve = lambda: 0.0 if (leader := _leader(rungs)) is None else min(retrain.seconds(leader), cap)
        result = _run_strategy(cfg, store, own, backend, rungs, allowance)
    progress.close()
    log_counts(f"search done ({result.best}, fitness {result.best_fitness:.4f})", rungs)
    if len(rungs) > 1 and result.best not in rungs[-1].outcomes:
        log.warning("the budget ran out before a genome reached the top rung: the winner was chosen on a cheaper rung")
    counts = [r.evaluator.counts() for r in rungs]
    metrics = {"new_evaluations": sum(c["trained"] + c["failed"] for c in counts), "reused_evaluations": sum(c["reused"] for c in counts),
               "failed_evaluations": sum(c["failed"] for c in counts), "search_seconds": budget.elapsed()}  # fmt: skip
    store.log(parent, metrics=metrics)
    final, final_spec = _retrain_winner(cfg, store, parent, own, result.best, retrain, budget, progress)
    return report(cfg, store, parent, rungs, result, final, final_spec, out_dir)


def _run_strategy(
    cfg: AppConfig, store: Store, own: OwnSearches, backend: Backend, rungs: list[SearchObjective], allowance: Allowance
) -> ClimbResult:
    """The population, then the strategy, through the rungs; the strategy's result."""
    sc = cfg.search
    rng = np.random.default_rng(sc.seed)
    population = sample_population(cfg.search_space, sc.population_size, rng)
    tables = {"table": _table(cfg, rungs[-1]), "foreign": _foreign(cfg, store, rungs[-1], own)}
    if sc.fidelity.mode == "asha":
        # POPULATION and STRATEGY through one asynchronous scheduler: the population is asked first.
        # Both limits hold, whichever ends first; with asynchronous rounds the population's evaluations count too.
        allowance.allow(sc.population_size + sc.budget if sc.budget is not None else 10**9)
        given = Proposals(population=population, eager=True, **tables)
        return Halving(rungs, sc.fidelity.eta, backend).run(sc.make(cfg.search_space, rng, given))
    objective = Halving(rungs, sc.fidelity.eta) if len(rungs) > 1 else rungs[0]
    # POPULATION: the paper's random models (halved through the rungs with fidelity); stored ones are reused.
    scores = dict(zip(population, objective(population), strict=True))
    log_counts("population", rungs)
    # STRATEGY
    allowance.allow(sc.budget if sc.budget is not None else 10**9)  # and the clock, if timed
    given = Proposals(known=scores, start=max(scores, key=lambda g: scores[g]), **tables)
    return drive(sc.make(cfg.search_space, rng, given), objective)


def _retrain_winner(
    cfg: AppConfig, store: Store, parent: str, own: OwnSearches, winner: Genome, retrain: _Retrain, budget: TimeBudget,
    progress: SearchProgress,
) -> tuple[Outcome, EvalSpec]:  # fmt: skip
    """RETRAIN the winner with the final budget and recipe: the run, and the spec it trained (its epochs as trained)."""
    final_spec = retrain.spec
    if budget.timed:
        earlier_epochs = earlier_final_epochs(store, own, winner)
        if earlier_epochs is not None:  # an earlier attempt retrained it already: the same run, reused
            final_spec = replace(final_spec, trainer=replace(final_spec.trainer, epochs=earlier_epochs))
        else:
            final_spec = _fit_final(final_spec, winner, retrain, budget)
    # The plan above is the cost model's; the trainer holds it to the budget's end from its own measured epochs
    # (fewer epochs, the schedule re-planned to them, when the retrain runs slower than predicted).
    log.info("retraining the winner %s: %s", winner, describe_budget(final_spec.trainer, final_spec.data))
    with EpochBar(final_spec.trainer.epochs, cfg.progress) as final_bar:

        def on_final_epoch(genome: Genome, epoch: int, row: dict[str, float]) -> None:
            final_bar.update(genome, epoch, row)
            progress.log_elapsed(step_on=False)

        backend = InProcess(fused=True, deadline=budget.retrain_deadline())
        retrainer = Evaluator(store, final_spec, backend, parent, on_final_epoch, role="final", register_as=cfg.registry.model_name)
        final = retrainer.evaluate(winner)
    if final.reused:
        log.info("the winner's final run %s was already in the store; reused", final.run_id)
    trained = final.metric("epochs_trained")
    if final.status == "FINISHED" and math.isfinite(trained) and trained < final_spec.trainer.epochs:
        log.warning("the retrain trained %d of its %d planned epochs: the rest would have run past search.time_budget (its "
                    "learning-rate schedule was re-planned to them)", trained, final_spec.trainer.epochs)  # fmt: skip
        final_spec = replace(final_spec, trainer=replace(final_spec.trainer, epochs=int(trained)))  # what the report states
    return final, final_spec


def _fit_final(spec: EvalSpec, genome: Genome, retrain: _Retrain, budget: TimeBudget) -> EvalSpec:
    """The final spec with as many of its epochs as the time budget has left (at least one), as the cost model predicts them."""
    per_epoch = images_per_evaluation(replace(spec.trainer, epochs=1), spec.data.n_train)
    overhead = retrain.cost.seconds(genome, 0)
    epochs = budget.retrain_epochs(spec.trainer.epochs, retrain.cost.seconds(genome, per_epoch) - overhead, overhead, retrain.speedup)
    if epochs < spec.trainer.epochs:
        log.warning("the retrain gets %d of final.epochs=%d epochs: that is what fits the %.0f s left of search.time_budget",
                    epochs, spec.trainer.epochs, budget.left())  # fmt: skip
    return replace(spec, trainer=replace(spec.trainer, epochs=epochs))


def _samples(store: Store, data: str | None) -> list[Sample]:
    """This host's measured evaluations on this data (its digest; None: Fashion-MNIST), for the cost model (genomes
    outside the default space are skipped: other layouts, and the wide space's larger filter counts)."""
    rows = store.cost_samples(host_name(), data)
    return [Sample(g, images, seconds, train) for text, images, seconds, train in rows if (g := genome_in(text, SearchSpace())) is not None]


def _leader(rungs: list[SearchObjective]) -> Genome | None:
    """The best genome so far at the highest rung reached (what the final retrain will most likely train)."""
    for rung in reversed(rungs):
        finished = [o for o in rung.outcomes.values() if o.status == "FINISHED"]
        if finished:
            return max(finished, key=rung.fitness_of).genome
    return None


def _foreign(cfg: AppConfig, store: Store, top: SearchObjective, own: OwnSearches) -> Callable[[], dict[Genome, float]]:
    """Other searches' results at this search's own budget, stored before its first attempt began (so every attempt
    sees the same ones), read when a sampler that learns from them asks (search=optuna)."""
    first = min(store.get_run(r).start_time for r in own.known)

    def results() -> dict[Genome, float]:
        found = top.evaluator.finished(lambda text: genome_in(text, cfg.search_space))
        return {o.genome: top.fitness_of(o) for o in found if o.parent_run_id not in own and o.end_time < first}

    return results


def _table(cfg: AppConfig, top: SearchObjective) -> Callable[[], list[tuple[Genome, int, float, float]]]:
    """The table climber's table: every recorded evaluation of the search's own budget whose genome is in its space (each
    one recorded in the top rung's outcomes, so that the report shows it), as (genome, params, accuracy, fitness)."""

    def rows() -> list[tuple[Genome, int, float, float]]:
        out = []
        for o in top.evaluator.finished(lambda text: genome_in(text, cfg.search_space)):  # outside this search's space: skipped
            top.record(o)
            out.append((o.genome, int(o.metric("param_count")), o.metric(cfg.fitness.metric), top.fitness_of(o)))
        return out

    return rows
