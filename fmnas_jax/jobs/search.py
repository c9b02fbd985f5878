"""The search job: population -> strategy -> the winner retrained -> report, under one parent MLflow run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fmnas_jax.backends import Backend, EvalSpec, InProcess, choose_backend, cpu_workers, opened
from fmnas_jax.budget import TimeBudget
from fmnas_jax.config import AppConfig
from fmnas_jax.cost import WORKERS_OVER_ONE_PROCESS, CostModel, Sample
from fmnas_jax.data import DataConfig
from fmnas_jax.evaluator import Evaluator, Outcome, budget_key, describe_budget
from fmnas_jax.genome import Genome, SearchSpace, sample_population
from fmnas_jax.jobs.common import card_of, class_report, open_store, print_card
from fmnas_jax.objective import Allowance, HalvingObjective, SearchObjective, images_per_evaluation
from fmnas_jax.progress import EpochBar, count_bar
from fmnas_jax.report import Card, Row, plot_curves, plot_search, write_card, write_csv
from fmnas_jax.scheduler import AsyncHalving
from fmnas_jax.search.base import ClimbResult, Proposals, drive
from fmnas_jax.store import Store, flatten, host_name

log = logging.getLogger("fmnas_jax")


def search_key(cfg: AppConfig) -> str:
    """Hash of what determines a search's path: space, strategy, fitness, budget and seeds."""
    blob: dict[str, Any] = {k: asdict(getattr(cfg, k)) for k in ("search_space", "search", "fitness")}
    blob["budget"] = budget_key(EvalSpec(cfg.trainer, cfg.data, cfg.seed))
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def n_train(data: DataConfig) -> int:
    """Training images a data config gives (the rest of the 60,000 after validation, or train_size)."""
    return data.n_train


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
    limits = [f"time budget {sc.time_budget} (search and final retrain)"] * bool(sc.time_budget)
    limits += [f"{sc.budget} new evaluations after the population"] * bool(sc.budget)
    limit = f"population {sc.population_size}"
    if limits:
        limit += ", " + " and ".join(limits) + (", whichever ends first" if len(limits) > 1 else "")
    log.info("search: %s, %s; each evaluation: %s", sc.strategy, limit, budgets)
    log.info("change it with e.g. search.time_budget=30m search.population_size=40 trainer.epochs=5 data.train_size=null")
    key = search_key(cfg)
    own = store.run_ids("search", "search_key", key)
    if own:
        log.info("this search (search_key %s) ran %d time(s) before: its stored evaluations are reused", key, len(own))
    parent = store.start_run(f"search {sc.strategy} seed={sc.seed}", "search", {"search.strategy": sc.strategy, "search_key": key})
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


class OwnSearches:
    """The search runs of one search_key: this one, its earlier attempts, and twins started meanwhile (another machine).

    Evaluations whose parent is one of them count against this search's budget even when reused, so
    that every attempt, and every machine running the same search, retraces the same path.
    """

    def __init__(self, store: Store, key: str, known: set[str]) -> None:
        self.store, self.key, self.known, self.others = store, key, set(known), set()

    def __contains__(self, run_id: object) -> bool:
        if not isinstance(run_id, str) or run_id in self.others:
            return False
        if run_id not in self.known:
            record = self.store.get_run(run_id)
            if record.role != "search" or record.tags.get("search_key") != self.key:
                self.others.add(run_id)
                return False
            self.known.add(run_id)
        return True


def _search(
    cfg: AppConfig, store: Store, parent: str, own: OwnSearches, backend: Backend, specs: list[EvalSpec], budget: TimeBudget, out_dir: Path
) -> Card:
    sc = cfg.search
    rng = np.random.default_rng(sc.seed)
    final_spec = EvalSpec(cfg.final.trainer(cfg.trainer), cfg.final.data(cfg.data), cfg.seed, keep_variables=True)
    cost = CostModel(_samples(store))
    final_images = images_per_evaluation(final_spec.trainer, n_train(final_spec.data))
    rungs: list[SearchObjective] = []
    # The final retrain runs in-process on every core: on a worker pool, faster than one worker's evaluation.
    # The search keeps back the leader's predicted retrain, but never more than search.final_share of the budget:
    # the retrain then trains the epochs that fit (see _fit_final).
    # (this machine's cores: a Ray cluster's other nodes do not speed up the retrain here)
    speedup = min(backend.parallelism, cpu_workers()) / WORKERS_OVER_ONE_PROCESS if backend.separate_processes else 1.0
    cap = budget.retrain_cap(sc.final_share)
    # A time budget holds across attempts: what earlier attempts of this search spent is charged, and a rerun of a
    # finished search only replays what it stored (trains nothing, so it ends where it ended).
    spent, finished = _earlier_attempts(store, own, parent)
    if spent or finished:
        log.info("earlier attempts of this search spent %.0f s of its time budget%s", spent, "; it finished: replaying it" * finished)
    budget.charge(spent)
    allowance = Allowance(
        None, budget.left() if budget.timed else None, cost, backend.parallelism, clock=budget.clock, replay_only=finished
    )
    progress = _Progress(cfg, store, parent, budget)
    epochs = EpochBar(cfg.trainer.epochs, cfg.progress and backend.streams_epochs)
    for r, spec in enumerate(specs):
        ev = Evaluator(store, spec, backend, parent, epochs.update, rung=r if len(specs) > 1 else None)
        rungs.append(SearchObjective(ev, cfg.fitness, own, allowance, n_train(spec.data), on_counted=progress.counted(r)))
    progress.rungs = rungs

    def reserve() -> float:  # the leader's predicted retrain, at most final_share of the budget
        leader = _leader(rungs)
        return 0.0 if leader is None else min(cost.seconds(leader, final_images) / speedup, cap)

    allowance.reserve = reserve
    population = sample_population(cfg.search_space, sc.population_size, rng)

    table = _table(cfg, rungs[-1])
    if sc.fidelity.mode == "asha":
        # POPULATION and STRATEGY through one asynchronous scheduler: the population is asked first.
        # Both limits hold, whichever ends first; with asynchronous rounds the population's evaluations count too.
        allowance.allow(sc.population_size + sc.budget if sc.budget is not None else 10**9)
        given = Proposals(population=population, eager=True, foreign=_foreign(cfg, store, rungs[-1], own), table=table)
        result = AsyncHalving(rungs, sc.fidelity.eta, backend).run(sc.make(cfg.search_space, rng, given))
    else:
        objective = HalvingObjective(rungs, sc.fidelity.eta) if len(rungs) > 1 else rungs[0]
        # POPULATION: the paper's random models (halved through the rungs with fidelity); stored ones are reused.
        scores = dict(zip(population, objective(population), strict=True))
        _log_counts("population", rungs)
        # STRATEGY
        allowance.allow(sc.budget if sc.budget is not None else 10**9)  # and the clock, if timed
        start = max(scores, key=lambda g: scores[g])
        given = Proposals(known=scores, start=start, foreign=_foreign(cfg, store, rungs[-1], own), table=table)
        result = drive(sc.make(cfg.search_space, rng, given), objective)
    progress.close()
    epochs.close()
    _log_counts(f"search done ({result.best}, fitness {result.best_fitness:.4f})", rungs)
    if len(rungs) > 1 and result.best not in rungs[-1].outcomes:
        log.warning("the budget ran out before a genome reached the top rung: the winner was chosen on a cheaper rung")
    counts = [r.evaluator.counts() for r in rungs]
    metrics = {"new_evaluations": sum(c["trained"] + c["failed"] for c in counts), "reused_evaluations": sum(c["reused"] for c in counts),
               "failed_evaluations": sum(c["failed"] for c in counts), "search_seconds": budget.elapsed()}  # fmt: skip
    store.log(parent, metrics=metrics)

    # RETRAIN the winner with the final budget and recipe, then REPORT.
    if budget.timed:
        earlier_epochs = _earlier_final_epochs(store, own, result.best)
        if earlier_epochs is not None:  # an earlier attempt retrained it already: the same run, reused
            final_spec = replace(final_spec, trainer=replace(final_spec.trainer, epochs=earlier_epochs))
        else:
            final_spec = _fit_final(final_spec, result.best, cost, speedup, budget)
    # The plan above is the cost model's; the trainer holds it to the budget's end from its own measured epochs
    # (fewer epochs, the schedule re-planned to them, when the retrain runs slower than predicted).
    deadline = budget.retrain_deadline()
    log.info("retraining the winner %s: %s", result.best, describe_budget(final_spec.trainer, final_spec.data))
    with EpochBar(final_spec.trainer.epochs, cfg.progress) as final_bar:

        def on_final_epoch(genome: Genome, epoch: int, row: dict[str, float]) -> None:
            final_bar.update(genome, epoch, row)
            progress.log_elapsed()

        final = Evaluator(store, final_spec, InProcess(fused=True, deadline=deadline), parent, on_final_epoch, role="final",
                          register_as=cfg.registry.model_name).evaluate(result.best)  # fmt: skip
    if final.reused:
        log.info("the winner's final run %s was already in the store; reused", final.run_id)
    trained = final.metric("epochs_trained")
    if final.status == "FINISHED" and math.isfinite(trained) and trained < final_spec.trainer.epochs:
        log.warning("the retrain trained %d of its %d planned epochs: the rest would have run past search.time_budget (its "
                    "learning-rate schedule was re-planned to them)", trained, final_spec.trainer.epochs)  # fmt: skip
        final_spec = replace(final_spec, trainer=replace(final_spec.trainer, epochs=int(trained)))  # what the report states
    return _report(cfg, store, parent, rungs, result, final, final_spec, out_dir)


def _fit_final(spec: EvalSpec, genome: Genome, cost: CostModel, speedup: float, budget: TimeBudget) -> EvalSpec:
    """The final spec with as many of its epochs as the time budget has left (at least one), as the cost model predicts them."""
    per_epoch = images_per_evaluation(replace(spec.trainer, epochs=1), n_train(spec.data))
    overhead = cost.seconds(genome, 0)
    epochs = budget.retrain_epochs(spec.trainer.epochs, cost.seconds(genome, per_epoch) - overhead, overhead, speedup)
    if epochs < spec.trainer.epochs:
        log.warning("the retrain gets %d of final.epochs=%d epochs: that is what fits the %.0f s left of search.time_budget",
                    epochs, spec.trainer.epochs, budget.left())  # fmt: skip
    return replace(spec, trainer=replace(spec.trainer, epochs=epochs))


def _samples(store: Store) -> list[Sample]:
    """This host's measured evaluations, for the cost model (genomes outside the default space are skipped:
    other layouts, and the wide space's larger filter counts)."""
    rows = store.cost_samples(host_name())
    return [Sample(g, images, seconds, train) for text, images, seconds, train in rows if (g := _parsed(text, SearchSpace())) is not None]


def _row(o: Outcome, fitness: float, rung: int | None) -> Row:
    m = o.metric
    return Row(str(o.genome), int(m("param_count")), m("train_accuracy"), m("val_accuracy"), m("test_accuracy"), fitness, o.eval_key,
               o.run_id, "reused" if o.reused else "trained", rung)  # fmt: skip


def _leader(rungs: list[SearchObjective]) -> Genome | None:
    """The best genome so far at the highest rung reached (what the final retrain will most likely train)."""
    for rung in reversed(rungs):
        finished = [o for o in rung.outcomes.values() if o.status == "FINISHED"]
        if finished:
            return max(finished, key=rung.fitness_of).genome
    return None


def _foreign(cfg: AppConfig, store: Store, top: SearchObjective, own: OwnSearches) -> dict[Genome, float]:
    """Other searches' results at this search's own budget, stored before its first attempt began (so every attempt
    sees the same ones), for a sampler that learns from them (search=optuna); {} for the other strategies."""
    if cfg.search.strategy != "optuna":
        return {}
    first = min(store.get_run(r).start_time for r in own.known)
    out = {}
    for o in top.evaluator.finished(lambda text: _parsed(text, cfg.search_space)):
        if o.parent_run_id not in own and o.end_time < first:
            out[o.genome] = top.fitness_of(o)
    return out


def _earlier_attempts(store: Store, own: OwnSearches, parent: str) -> tuple[float, bool]:
    """(seconds the earlier attempts of this search spent, whether one of them finished)."""
    spent, finished = 0.0, False
    for run_id in sorted(own.known - {parent}):
        record = store.get_run(run_id)
        spent += max(record.metric("elapsed_seconds"), 0.0) if math.isfinite(record.metric("elapsed_seconds")) else 0.0
        finished |= record.status == "FINISHED"
    return spent, finished


def _earlier_final_epochs(store: Store, own: OwnSearches, genome: Genome) -> int | None:
    """The epochs of this winner's final retrain by an earlier attempt of this search, if one finished."""
    for record in store.finished_runs("final", str(genome)):
        if record.parent_run_id in own:
            return record.int_param("trainer.epochs")
    return None


def _table(cfg: AppConfig, top: SearchObjective) -> Callable[[], list[tuple[Genome, int, float, float]]]:
    """The table climber's table: every recorded evaluation of the search's own budget whose genome is in its space (each
    one recorded in the top rung's outcomes, so that the report shows it), as (genome, params, accuracy, fitness)."""

    def rows() -> list[tuple[Genome, int, float, float]]:
        out = []
        for o in top.evaluator.finished(lambda text: _parsed(text, cfg.search_space)):  # outside this search's space: skipped
            top.record(o)
            out.append((o.genome, int(o.metric("param_count")), o.metric(cfg.fitness.metric), top.fitness_of(o)))
        return out

    return rows


def _parsed(text: str, space: SearchSpace) -> Genome | None:
    """The genome if `space` contains it, else None."""
    try:
        return Genome.parse(text, space)
    except ValueError:
        return None


class _Progress:
    """The search's progress: a bar of new evaluations (count budget) or of the time budget, with ETA, and the
    search run's metrics at each counted evaluation (step = evaluations counted): `elapsed_seconds` (what a
    resumed attempt charges against the time budget), `evaluations_r<rung>`, and the anytime curve,
    `best_fitness` and `best_val_accuracy` of the top rung so far."""

    def __init__(self, cfg: AppConfig, store: Store, parent: str, budget: TimeBudget) -> None:
        sc, self.budget, self.store, self.parent, self.count = cfg.search, budget, store, parent, 0
        self.seconds = sc.time_budget_seconds
        self.rungs: list[SearchObjective] = []
        self.per_rung: dict[int, int] = {}
        self.best: dict[str, float] = {}
        planned = sc.population_size + (sc.budget or 0)
        if self.seconds is not None:
            self.bar = count_bar(int(self.seconds), "time budget", "s", cfg.progress)
        else:
            self.bar = count_bar(planned if sc.fidelity.mode == "none" else None, "new evaluations", "eval", cfg.progress)

    def counted(self, rung: int) -> Callable[[Outcome], None]:
        """The callback of rung `rung`'s objective: one counted evaluation arrived."""
        return lambda o: self.tick(rung, o)

    def tick(self, rung: int, o: Outcome) -> None:
        if self.seconds is None:
            self.bar.update()
        else:
            self.bar.update(min(int(self.budget.elapsed()), int(self.seconds)) - self.bar.n)
        self.per_rung[rung] = self.per_rung.get(rung, 0) + 1
        metrics = {f"evaluations_r{rung}": float(self.per_rung[rung])}
        if rung == len(self.rungs) - 1 and o.status == "FINISHED":
            for name, value in (("best_fitness", self.rungs[rung].fitness_of(o)), ("best_val_accuracy", o.metric("val_accuracy"))):
                if math.isfinite(value) and value > self.best.get(name, -math.inf):
                    self.best[name] = value
        self.log_elapsed(metrics | self.best)

    def log_elapsed(self, metrics: dict[str, float] | None = None) -> None:
        self.count += 1
        self.store.log(self.parent, metrics={"elapsed_seconds": self.budget.elapsed()} | (metrics or {}), step=self.count)

    def close(self) -> None:
        self.bar.close()


def _views(store: Store, parent: str, n_rungs: int) -> str:
    """Links to the filtered runs tables this search's description talks about (no id to copy by hand)."""
    mine = f"tags.mlflow.parentRunId = '{parent}'"
    views = [("every evaluation of this search", f"{mine} AND tags.`fmnas.role` = 'evaluation'")]
    if n_rungs > 1:
        views += [
            (f"rung {r}" + (" (the top rung)" if r == n_rungs - 1 else ""), f"{mine} AND tags.`fmnas.rung` = '{r}'") for r in range(n_rungs)
        ]
    views.append(("the winner's final run", f"{mine} AND tags.`fmnas.role` = 'final'"))
    items = "\n".join(f"- [{what}]({store.view(search_filter=f)})" for what, f in views)
    return f"Views (Chart view on any of them: `param_count` against `val_accuracy`):\n{items}\n\nProgress: this run's `best_fitness`, " \
           "`best_val_accuracy` (top rung) and `evaluations_r<rung>` metrics, against Step (evaluations counted) or Time."  # fmt: skip


def _log_counts(stage: str, rungs: list[SearchObjective]) -> None:
    parts = ["rung {}: {trained} trained, {reused} reused, {failed} failed".format(i, **r.evaluator.counts()) for i, r in enumerate(rungs)]
    log.info("%s; %s", stage, "; ".join(parts) if len(rungs) > 1 else parts[0].split(": ", 1)[1])


def _report(
    cfg: AppConfig,
    store: Store,
    parent: str,
    rungs: list[SearchObjective],
    result: ClimbResult,
    final: Outcome,
    final_spec: EvalSpec,
    out_dir: Path,
) -> Card:
    rows = [_row(o, rung.fitness_of(o), r if len(rungs) > 1 else None) for r, rung in enumerate(rungs) for o in rung.outcomes.values()
            if o.status == "FINISHED"]  # fmt: skip
    files = [write_csv(rows, out_dir / "results.csv")]
    shown = [row for row in rows if row.rung in (None, len(rungs) - 1)]
    title = f"{cfg.search.strategy} search, seed {cfg.search.seed}: {len(shown)} evaluations ({describe_budget(cfg.trainer, cfg.data)})"
    if len(rungs) > 1:
        title += f"; {len(rows) - len(shown)} more screened on cheaper rungs (shown by validation accuracy)"
    final_point = (int(final.metric("param_count")), final.metric("test_accuracy"))
    moved = [str(s.genome) for s in result.path if s.move != "best"]  # a "best" step is the winner chosen, not a move
    files.append(plot_search(rows, moved, str(final.genome), out_dir / "params_vs_accuracy.png", title, final_point))
    path = [asdict(s) | {"genome": str(s.genome)} for s in result.path]
    (out_dir / "climb_path.json").write_text(json.dumps(path, indent=1, default=float) + "\n")
    files.append(out_dir / "climb_path.json")
    if final.history:
        files.append(plot_curves(final.history, str(final.genome), out_dir / "winner_curves.png"))
    card = card_of(final, store, describe_budget(final_spec.trainer, final_spec.data))
    files += write_card(card, out_dir)
    per_class = class_report(final, store, cfg, out_dir)
    if not final.reused:  # the winner's own run gets its per-class report too
        for f in per_class:
            store.log_file(final.run_id, f, "report")
    files += per_class
    for f in files:
        store.log_file(parent, f, "report")
    store.log(
        parent,
        metrics={"winner_params": card.params, "winner_val_accuracy": card.val_accuracy, "winner_test_accuracy": card.test_accuracy},
        tags={"winner": card.genome, "winner_run_id": card.run_id},
    )
    link = store.view(card.run_id)
    retrained = describe_budget(final_spec.trainer, final_spec.data)
    store.describe(parent, f"A {cfg.search.strategy} search, seed {cfg.search.seed}.\n\nWinner: [`{card.genome}`]({link}), "
                           f"retrained: {retrained}.\n\n{_views(store, parent, len(rungs))}\n\n{card.markdown()}")  # fmt: skip
    print_card(card, out_dir, store)
    return card
