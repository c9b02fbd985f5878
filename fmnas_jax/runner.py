"""Jobs: train one genome, or run a whole search. Glue between store, trainer and strategies.

The Evaluator is the one place that decides whether a genome is trained or read back from
MLflow; strategies only ever see an Objective (genomes in, fitness values out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fmnas_jax import data as data_mod
from fmnas_jax.config import AppConfig
from fmnas_jax.data import CLASS_NAMES
from fmnas_jax.genome import Genome, count_params, sample_population
from fmnas_jax.inference import (
    CHECKPOINT_ARTIFACT,
    TrainedModel,
    confusion_matrix,
    load_checkpoint,
    load_run,
    per_class_markdown,
    read_images,
)
from fmnas_jax.model import CheckpointError, checkpoint_bytes
from fmnas_jax.parallel import DevicePool, WorkerPool, cpu_workers
from fmnas_jax.report import Card, Row, plot_confusion, plot_curves, plot_search, write_card, write_csv
from fmnas_jax.search import fitness, hill_climb, table_climb
from fmnas_jax.search.base import ClimbResult
from fmnas_jax.store import BUDGET_KEY, CHECKPOINT, DUPLICATE_OF, EVAL_KEY, GENOME, Store, flatten
from fmnas_jax.train import (
    DeviceData,
    EvalResult,
    TrainConfig,
    compiled_eval,
    evaluate_split,
    platform_summary,
    to_device,
    train_and_evaluate,
)

log = logging.getLogger("fmnas_jax")
EVAL_VERSION = 1  # bump when the trainer or model changes what a setting produces


def budget_key(trainer: TrainConfig, data: data_mod.DataConfig, seed: int) -> str:
    """Hash of everything besides the genome that changes an evaluation's result."""
    blob = {"v": EVAL_VERSION, "trainer": trainer.result_settings(), "data": data.result_settings(), "seed": seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def eval_key(genome: Genome | str, budget: str) -> str:
    """Hash of genome + budget: equal keys mean equal results (on one platform)."""
    return hashlib.sha256(f"{budget}|{genome}".encode()).hexdigest()[:16]


def describe_budget(trainer: TrainConfig, data: data_mod.DataConfig) -> str:
    """One line for logs and cards: epochs, images, batch, learning rate."""
    train = "all" if data.train_size is None else f"{data.train_size:,}"
    epochs = f"{trainer.epochs} epoch{'s' * (trainer.epochs != 1)}"
    return f"{epochs}, {train} training images, val {data.val_size:,}, batch {trainer.batch_size}, lr {trainer.learning_rate}"


@dataclass
class Outcome:
    """One genome's evaluation as the search sees it: from this process or read back from the store."""

    genome: str
    eval_key: str
    run_id: str
    status: str
    metrics: dict[str, float]
    reused: bool
    history: dict[str, list[float]] = field(default_factory=dict)
    variables: Any = None
    parent_run_id: str | None = None
    normalisation: tuple[float, float] | None = None

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


class Evaluator:
    """Trains a genome unless the store already has a FINISHED run with the same eval_key."""

    def __init__(
        self,
        store: Store,
        cfg: AppConfig,
        trainer: TrainConfig,
        data: data_mod.DataConfig,
        parent_run_id: str | None,
        config_yaml: str,
        keep_variables: bool = False,
        pool: WorkerPool | DevicePool | None = None,
    ) -> None:
        self.store, self.cfg, self.trainer, self.data = store, cfg, trainer, data
        self.parent_run_id, self.config_yaml, self.keep_variables = parent_run_id, config_yaml, keep_variables
        self.pool = pool
        self.budget = budget_key(trainer, data, cfg.seed)
        self.known = {s.eval_key: s for s in store.finished_evaluations(self.budget)}
        self._device_data: DeviceData | None = None
        self.trained = self.reused = self.failed = 0

    def device_data(self) -> DeviceData:
        """Load and place the data on first use, so a fully cached search never touches it."""
        if self._device_data is None:
            dataset = data_mod.load(self.data, self.cfg.seed)
            log.info("data: %s", dataset.summary())
            self._device_data = to_device(dataset, self.trainer.eval_batch_size)
        return self._device_data

    def lookup(self, genome: Genome) -> Outcome | None:
        """A stored FINISHED result for this genome and budget, if any (cheap: dict, then one SQL query)."""
        key = eval_key(genome, self.budget)
        stored = self.known.get(key) or self.store.find_finished(key)
        if stored is None:
            return None
        self.known[key] = stored
        return Outcome(stored.genome, key, stored.run_id, "FINISHED", stored.metrics, reused=True, parent_run_id=stored.parent_run_id)

    def evaluate(self, genome: Genome) -> Outcome:
        """Reuse or train one genome; a failure (NaN, exception) comes back FAILED, not raised."""
        return self.evaluate_many([genome])[0]

    def evaluate_many(self, genomes: Sequence[Genome], bar: tqdm | None = None) -> list[Outcome]:
        """Reuse or train each genome (on the worker pool when there is one); results in input order."""
        done: dict[str, Outcome] = {}
        pending: dict[str, Genome] = {}
        for g in genomes:
            found = self.lookup(g)
            if found is not None:
                self.reused += 1
                done[str(g)] = found
            else:
                pending.setdefault(str(g), g)
        runs = {name: self._start(g) for name, g in pending.items()}  # RUNNING in the UI from now on
        try:
            for g, result in self._results(list(pending.values()), runs):
                done[str(g)] = self._finish(g, runs[str(g)], result)
                if bar is not None:
                    bar.update()
        except BaseException:
            for name, run_id in runs.items():
                if name not in done:
                    self.store.end_run(run_id, "KILLED", "interrupted before this evaluation finished")
            raise
        return [done[str(g)] for g in genomes]

    def _start(self, genome: Genome) -> str:
        key = eval_key(genome, self.budget)
        tags = {GENOME: str(genome), EVAL_KEY: key, BUDGET_KEY: self.budget}
        run_id = self.store.start_run(str(genome), "evaluation", tags, self.parent_run_id)
        self.store.log(run_id, params=self._params(genome))
        self.store.log_text(run_id, self.config_yaml, "config.yaml")
        return run_id

    def _results(self, genomes: list[Genome], runs: dict[str, str]) -> Iterator[tuple[Genome, EvalResult]]:
        if self.pool is not None and genomes:
            for g, result in self.pool.map_unordered(genomes, self.trainer, self.data, self.cfg.seed, self.keep_variables):
                for epoch, row in enumerate(_rows(result.history), start=1):  # curves arrive whole from a worker
                    self.store.log(runs[str(g)], metrics=row, step=epoch)
                yield g, result
            return
        for g in genomes:
            try:
                yield g, self._train(g, runs[str(g)])
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one broken genome must not end a search of many
                log.error("evaluation of %s raised:\n%s", g, traceback.format_exc())
                yield g, EvalResult(str(g), "FAILED", count_params(g), reason=f"{type(e).__name__}: {e}")

    def _params(self, genome: Genome) -> dict[str, Any]:
        genes: dict[str, Any] = {}
        for i, c in enumerate(genome.convs, start=1):
            genes.update(
                {
                    f"layer{i}.type": c.kind,
                    f"layer{i}.filters": c.filters,
                    f"layer{i}.kernel": c.kernel,
                    f"layer{i}.activation": c.activation,
                }
            )
        genes["head.activation"] = genome.head_activation
        settings = {"trainer": self.trainer.result_settings(), "data": self.data.result_settings(), "seed": self.cfg.seed}
        return genes | flatten("", settings)

    def _train(self, genome: Genome, run_id: str) -> EvalResult:
        dd = self.device_data()
        epochs = tqdm(total=self.trainer.epochs, desc="  epochs", leave=False, disable=not self.cfg.progress, unit="ep")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            self.store.log(run_id, metrics=row, step=epoch)
            epochs.update()
            epochs.set_postfix(val_acc=f"{row['val_accuracy']:.4f}")

        try:
            return train_and_evaluate(genome, dd, self.trainer, self.cfg.seed, on_epoch, self.keep_variables)
        finally:
            epochs.close()

    def _save_weights(self, genome: Genome, run_id: str, result: EvalResult) -> None:
        """The trained variables as a msgpack artifact, with the genome and normalisation (no pickle)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
            path.write_bytes(checkpoint_bytes(genome, result.variables, result.normalisation))
            self.store.log_file(run_id, path, str(Path(CHECKPOINT_ARTIFACT).parent))
        self.store.log(run_id, tags={CHECKPOINT: CHECKPOINT_ARTIFACT})

    def _finish(self, genome: Genome, run_id: str, result: EvalResult) -> Outcome:
        key = eval_key(genome, self.budget)
        metrics = result.metrics()
        per_epoch = set(result.history)  # already logged each epoch; the last value is the final one
        self.store.log(
            run_id, metrics={k: v for k, v in metrics.items() if k not in per_epoch}, step=len(result.history.get("train_loss", []))
        )
        if result.status == "FINISHED":
            earlier = self.store.find_finished(key)  # another process may have finished it meanwhile
            if earlier is not None and earlier.run_id != run_id:
                self.store.log(run_id, tags={DUPLICATE_OF: earlier.run_id})
            if result.variables is not None:
                self._save_weights(genome, run_id, result)
            self.store.end_run(run_id, "FINISHED")
            self.trained += 1
            log.info(
                "trained %s: %d params, val %.4f, test %.4f (train %.1f s at %.0f img/s; compile %.1f s, %d cache hits)",
                genome,
                result.param_count,
                result.val_accuracy,
                result.test_accuracy,
                result.train_seconds,
                result.images_per_second,
                result.compile_seconds,
                result.cache_hits,
            )
        else:
            self.store.end_run(run_id, "FAILED", result.reason)
            self.failed += 1
            log.warning("evaluation of %s FAILED: %s", genome, result.reason)
        return Outcome(str(genome), key, run_id, result.status, metrics, False, result.history, result.variables,
                       normalisation=result.normalisation)  # fmt: skip


def _rows(history: dict[str, list[float]]) -> list[dict[str, float]]:
    """Per-epoch rows from a history of columns."""
    n = len(history.get("train_loss", []))
    return [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(n)]


class SearchObjective:
    """Fitness for strategies, with a budget of evaluations new to this search.

    Free: genomes this search has already seen, and results another search stored. Counted:
    genomes trained now, and results an earlier attempt of this same search stored (a rerun
    or a resume after a crash), so that a rerun retraces the same path and trains nothing.
    """

    def __init__(self, evaluator: Evaluator, cfg: AppConfig, own_searches: set[str], bar: tqdm) -> None:
        self.evaluator, self.cfg, self.own_searches, self.bar = evaluator, cfg, own_searches, bar
        self.budget: int | None = None
        self.new = 0
        self._exhausted = False
        self.outcomes: dict[str, Outcome] = {}  # genome -> outcome, in first-seen order

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    def fitness_of(self, o: Outcome) -> float:
        if o.status != "FINISHED":
            return -math.inf  # failed (e.g. diverged): the worst fitness, and the search goes on
        return fitness(self.cfg.fitness, o.metric(self.cfg.fitness.metric), int(o.metric("param_count")))

    @property
    def parallelism(self) -> int:
        """How many genomes one call can evaluate at once (strategies may batch by it)."""
        return self.evaluator.pool.n if self.evaluator.pool is not None else 1

    def __call__(self, genomes: Sequence[Genome]) -> list[float]:
        todo: list[Genome] = []
        for g in dict.fromkeys(genomes):  # unique, in order
            if str(g) in self.outcomes:
                continue
            known = self.evaluator.lookup(g)
            free = known is not None and known.parent_run_id not in self.own_searches
            if not free:
                if self.budget is not None and self.new >= self.budget:
                    self._exhausted = True
                    continue
                self.new += 1
            if known is None:
                todo.append(g)
                continue
            self.evaluator.reused += 1
            self.outcomes[str(g)] = known
            if not free:
                self.bar.update()
        for o in self.evaluator.evaluate_many(todo, self.bar):
            self.outcomes[o.genome] = o
        return [self.fitness_of(self.outcomes[str(g)]) if str(g) in self.outcomes else -math.inf for g in genomes]


def search_key(cfg: AppConfig) -> str:
    """Hash of what determines a search's path: space, strategy, fitness, budget and seeds."""
    blob = {k: asdict(getattr(cfg, k)) for k in ("search_space", "search", "fitness")}
    blob["budget"] = budget_key(cfg.trainer, cfg.data, cfg.seed)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


def run_train(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Train and evaluate `cfg.genome` (the paper's step VII); print and save its result card."""
    genome = Genome.parse(cfg.genome or "", cfg.search_space)
    data_mod.load_arrays(cfg.data.source, cfg.data.dir, cfg.data.verify)  # fail on bad data before any run exists
    store = Store(cfg.tracking.uri, cfg.tracking.experiment)
    log.info("results go to MLflow: %s (experiment %r)", store.uri, cfg.tracking.experiment)
    store.reap_orphans()
    ev = Evaluator(store, cfg, cfg.trainer, cfg.data, None, config_yaml, keep_variables=cfg.trainer.save)
    outcome = ev.evaluate(genome)
    if outcome.reused:
        log.info("reused stored run %s (same genome and budget); nothing trained", outcome.run_id)
    if outcome.status != "FINISHED":
        raise RuntimeError(f"evaluation of {genome} failed: see MLflow run {outcome.run_id}")
    card = _card(outcome, store, describe_budget(cfg.trainer, cfg.data))
    files = write_card(card, out_dir)
    if outcome.history:
        files.append(plot_curves(outcome.history, str(genome), out_dir / "curves.png"))
    files += _class_report(outcome, store, cfg, out_dir)
    if not outcome.reused:
        for f in files:
            store.log_file(outcome.run_id, f, "report")
    _print_card(card, out_dir)
    return card


def _class_report(o: Outcome, store: Store, cfg: AppConfig, out_dir: Path) -> list[Path]:
    """Per-class test accuracy and a confusion matrix with Fashion-MNIST's class names (needs the weights)."""
    if o.variables is not None and o.normalisation is not None:
        model = TrainedModel(Genome.parse(o.genome, cfg.search_space), o.variables, o.normalisation)
    elif CHECKPOINT in store.get_run(o.run_id).data.tags:
        model = load_run(o.run_id, store=store)
    else:
        return []
    arrays, _ = data_mod.load_arrays(cfg.data.source, cfg.data.dir, cfg.data.verify)
    x_test, y_test = arrays[2], arrays[3]
    cm = confusion_matrix(y_test, model.predict_fn()(x_test))
    table = out_dir / "per_class.md"
    table.write_text(f"# Per-class test accuracy\n\n`{o.genome}`\n\n" + per_class_markdown(cm))
    np.savetxt(out_dir / "confusion_matrix.csv", cm, fmt="%d", delimiter=",", header=",".join(CLASS_NAMES))
    title = f"{o.genome}  test accuracy {100 * np.trace(cm) / cm.sum():.2f}%"
    fig = plot_confusion(cm, CLASS_NAMES, title, out_dir / "confusion_matrix.png")
    log.info("per-class test accuracy:\n%s", per_class_markdown(cm))
    return [table, out_dir / "confusion_matrix.csv", fig]


def _card(o: Outcome, store: Store, budget: str) -> Card:
    return Card(
        o.genome,
        int(o.metric("param_count")),
        o.metric("train_accuracy"),
        o.metric("val_accuracy"),
        o.metric("test_accuracy"),
        o.eval_key,
        o.run_id,
        store.uri,
        budget,
    )


def _print_card(card: Card, out_dir: Path) -> None:
    print("\n" + card.markdown())
    print(f"Files: {out_dir.resolve()}")
    print(f"MLflow: {card.tracking_uri} (run {card.run_id})")


def run_search(cfg: AppConfig, config_yaml: str, out_dir: Path, on_platform: str = "") -> Card:
    """Population -> climb -> retrain the winner -> report; everything logged under one parent run."""
    sc = cfg.search
    data_mod.load_arrays(cfg.data.source, cfg.data.dir, cfg.data.verify)  # fail on bad data before any run exists
    store = Store(cfg.tracking.uri, cfg.tracking.experiment)
    log.info("results go to MLflow: %s (experiment %r)", store.uri, cfg.tracking.experiment)
    reaped = store.reap_orphans()
    if reaped:
        log.warning("marked %d run(s) of killed processes as KILLED", len(reaped))
    log.info(
        "search budget: population %d, %d new evaluations for the climb, each %s%s",
        sc.population_size,
        sc.budget,
        describe_budget(cfg.trainer, cfg.data),
        on_platform,
    )
    log.info("change it with e.g. search.population_size=40 search.budget=60 trainer.epochs=5 data.train_size=null")
    key = search_key(cfg)
    own = store.run_ids("search", "search_key", key)
    if own:
        log.info("this search (search_key %s) ran %d time(s) before: its stored evaluations are reused", key, len(own))
    parent = store.start_run(f"search {sc.strategy} seed={sc.seed}", "search", {"search.strategy": sc.strategy, "search_key": key})
    store.log(parent, params=_search_params(cfg))
    store.log_text(parent, config_yaml, "config.yaml")
    try:
        card = _search(cfg, store, parent, own | {parent}, config_yaml, out_dir)
    except BaseException as e:
        store.end_run(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", f"{type(e).__name__}: {e}")
        raise
    store.end_run(parent, "FINISHED")
    return card


def _search_params(cfg: AppConfig) -> dict[str, Any]:
    keep = ("search", "fitness", "trainer", "data", "final")
    return flatten("", {k: asdict(getattr(cfg, k)) for k in keep}) | {"seed": cfg.seed}


def evaluation_pool(cfg: AppConfig) -> tuple[WorkerPool | DevicePool | None, str]:
    """The fastest evaluation path for this platform, and a description for the log.

    Several devices (GPUs, or CPU devices made with JAX_NUM_CPU_DEVICES): one evaluation per device.
    One multi-core CPU: one single-threaded worker process per core. Otherwise: in-process.
    """
    backend, devices = jax.default_backend(), jax.devices()
    if cfg.workers == 1:
        return None, f"in-process on {platform_summary()} (workers=1)"
    if len(devices) > 1:
        pool = DevicePool(devices[: cfg.workers or len(devices)])
        return pool, f"{pool.n} devices, one evaluation on each at a time ({platform_summary()})"
    n = cfg.workers or (cpu_workers() if backend == "cpu" else 1)
    if n > 1 and backend == "cpu":
        return WorkerPool(n, cfg.cache_dir), f"{n} worker processes, each pinned to one CPU core (workers=1 to disable)"
    return None, f"in-process on {platform_summary()}"


def _search(cfg: AppConfig, store: Store, parent: str, own: set[str], config_yaml: str, out_dir: Path) -> Card:
    rng = np.random.default_rng(cfg.search.seed)
    pool, path = evaluation_pool(cfg)
    log.info("evaluation path: %s", path)
    try:
        return _search_with(cfg, store, parent, own, config_yaml, out_dir, rng, pool)
    finally:
        if pool is not None:
            pool.close()


def _search_with(
    cfg: AppConfig,
    store: Store,
    parent: str,
    own: set[str],
    config_yaml: str,
    out_dir: Path,
    rng: np.random.Generator,
    pool: WorkerPool | DevicePool | None,
) -> Card:
    sc = cfg.search
    ev = Evaluator(store, cfg, cfg.trainer, cfg.data, parent, config_yaml, pool=pool)
    planned = sc.population_size + (sc.budget if sc.strategy == "hillclimb" else 0)
    bar = tqdm(total=planned, desc="new evaluations (max)", unit="eval", disable=not cfg.progress, dynamic_ncols=True)
    objective = SearchObjective(ev, cfg, own, bar)

    # POPULATION: the paper's random models; stored ones are reused, not retrained.
    population = sample_population(cfg.search_space, sc.population_size, rng)
    scores = objective(population)
    log.info("population: %d genomes, %d trained, %d reused, %d failed", len(population), ev.trained, ev.reused, ev.failed)

    # CLIMB
    if sc.strategy == "hillclimb":
        objective.budget = objective.new + sc.budget
        start = population[int(np.argmax(scores))]
        climb = hill_climb(cfg.search_space, objective, rng, sc, start)
    else:
        climb = _table_climb(cfg, ev, objective, rng)
    bar.close()
    log.info(
        "climb: %d steps, best %s (fitness %.4f); evaluations so far: %d trained, %d reused, %d failed",
        len(climb.path),
        climb.best,
        climb.best_fitness,
        ev.trained,
        ev.reused,
        ev.failed,
    )
    store.log(parent, metrics={"new_evaluations": ev.trained + ev.failed, "reused_evaluations": ev.reused, "failed_evaluations": ev.failed})

    # RETRAIN the winner with the final budget, then REPORT.
    final = _retrain(cfg, store, parent, config_yaml, Genome.parse(climb.best, cfg.search_space))
    return _report(cfg, store, parent, ev, objective, climb, final, out_dir)


def _table_climb(cfg: AppConfig, ev: Evaluator, objective: SearchObjective, rng: np.random.Generator) -> ClimbResult:
    rows = []
    for s in ev.store.finished_evaluations(ev.budget):  # every recorded evaluation of this budget
        o = Outcome(s.genome, s.eval_key, s.run_id, "FINISHED", s.metrics, True)
        objective.outcomes.setdefault(s.genome, o)
        rows.append((s.genome, int(s.metric("param_count")), s.metric(cfg.fitness.metric), objective.fitness_of(o)))
    return table_climb(rows, rng, cfg.search.patience, max(cfg.search.max_restarts, 1000))


def _final_settings(cfg: AppConfig) -> tuple[TrainConfig, data_mod.DataConfig]:
    f = cfg.final
    trainer = replace(
        cfg.trainer, epochs=f.epochs or cfg.trainer.epochs, learning_rate=f.learning_rate or cfg.trainer.learning_rate, save=True
    )
    return trainer, replace(cfg.data, train_size=f.train_size)


def _retrain(cfg: AppConfig, store: Store, parent: str, config_yaml: str, genome: Genome) -> Outcome:
    trainer, data = _final_settings(cfg)
    log.info("retraining the winner %s: %s", genome, describe_budget(trainer, data))
    ev = Evaluator(store, cfg, trainer, data, parent, config_yaml, keep_variables=True)
    outcome = ev.evaluate(genome)
    if outcome.reused:
        log.info("the winner's final run %s was already in the store; reused", outcome.run_id)
    return outcome


def _report(
    cfg: AppConfig, store: Store, parent: str, ev: Evaluator, objective: SearchObjective, climb: ClimbResult, final: Outcome, out_dir: Path
) -> Card:
    rows = [
        Row(
            o.genome,
            int(o.metric("param_count")),
            o.metric("train_accuracy"),
            o.metric("val_accuracy"),
            o.metric("test_accuracy"),
            objective.fitness_of(o),
            o.eval_key,
            o.run_id,
            "reused" if o.reused else "trained",
        )
        for o in objective.outcomes.values()
        if o.status == "FINISHED"
    ]
    files = [write_csv(rows, out_dir / "results.csv")]
    title = f"{cfg.search.strategy} search, seed {cfg.search.seed}: {len(rows)} evaluations ({describe_budget(cfg.trainer, cfg.data)})"
    final_point = (int(final.metric("param_count")), final.metric("test_accuracy"))
    files.append(plot_search(rows, [s.genome for s in climb.path], final.genome, out_dir / "params_vs_accuracy.png", title, final_point))
    (out_dir / "climb_path.json").write_text(json.dumps([s.__dict__ for s in climb.path], indent=1, default=float) + "\n")
    files.append(out_dir / "climb_path.json")
    if final.history:
        files.append(plot_curves(final.history, final.genome, out_dir / "winner_curves.png"))
    card = _card(final, store, describe_budget(*_final_settings(cfg)))
    files += write_card(card, out_dir)
    per_class = _class_report(final, store, cfg, out_dir)
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
    _print_card(card, out_dir)
    return card


def run_predict(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Load saved weights, re-measure test accuracy with the evaluation program, classify `images`."""
    del config_yaml  # nothing is logged: predicting writes no run
    data_cfg, seed, logged, store = cfg.data, cfg.seed, math.nan, None
    if cfg.run_id:
        store = Store(cfg.tracking.uri, cfg.tracking.experiment)
        run = store.get_run(cfg.run_id)
        model = load_run(cfg.run_id, store=store)
        p = run.data.params  # evaluate on exactly the split the run was trained with
        train_size = None if p.get("data.train_size", "None") == "None" else int(p["data.train_size"])
        data_cfg = replace(cfg.data, val_size=int(p.get("data.val_size", cfg.data.val_size)), train_size=train_size)
        seed, logged = int(p.get("seed", cfg.seed)), run.data.metrics.get("test_accuracy", math.nan)
    else:
        model = load_checkpoint(cfg.checkpoint or "")
    if cfg.genome and str(Genome.parse(cfg.genome, cfg.search_space)) != str(model.genome):
        raise CheckpointError(f"genome {cfg.genome!r} does not match the checkpoint's {model.genome}")
    dd = to_device(data_mod.load(data_cfg, seed), cfg.trainer.eval_batch_size)
    variables = jax.device_put(model.variables)
    _, test_acc = evaluate_split(compiled_eval(model.genome, variables, dd), variables, dd, dd.test_range)
    same = "matches the logged value" if test_acc == logged else f"logged: {logged:.4f}" if math.isfinite(logged) else "no logged value"
    print(f"\n{model.genome}: {count_params(model.genome):,} params, test accuracy {100 * test_acc:.2f}% ({same})")
    if cfg.images:
        images = read_images(cfg.images)
        pred = model.predict_fn()(images)
        with (out_dir / "predictions.csv").open("w") as f:
            f.write("index,class_id,class_name\n")
            f.writelines(f"{i},{c},{CLASS_NAMES[c]}\n" for i, c in enumerate(pred))
        for i, c in enumerate(pred[:20]):
            print(f"  image {i}: {CLASS_NAMES[c]}")
        counts = ", ".join(f"{CLASS_NAMES[c]} {n}" for c, n in enumerate(np.bincount(pred, minlength=10)) if n)
        print(f"{len(pred)} images classified ({counts}); all predictions: {(out_dir / 'predictions.csv').resolve()}")
    uri = store.uri if store else str(cfg.checkpoint)
    return Card(str(model.genome), count_params(model.genome), math.nan, math.nan, test_acc, "", cfg.run_id or "", uri,
                describe_budget(cfg.trainer, data_cfg))  # fmt: skip


def run(cfg: AppConfig, config_yaml: str, out_dir: Path, on_platform: str = "") -> Card:
    """Dispatch on cfg.mode."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "search":
        return run_search(cfg, config_yaml, out_dir, on_platform)
    if cfg.mode == "predict":
        return run_predict(cfg, config_yaml, out_dir)
    return run_train(cfg, config_yaml, out_dir)
