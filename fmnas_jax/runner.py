"""Jobs: train one genome, run a whole search, or predict with saved weights.

Glue between the evaluator (train or reuse), the strategies and the report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fmnas_jax import data as data_mod
from fmnas_jax.config import AppConfig
from fmnas_jax.data import CLASS_NAMES
from fmnas_jax.evaluator import Evaluator, Outcome, SearchObjective, describe_budget, search_key
from fmnas_jax.genome import Genome, count_params, sample_population
from fmnas_jax.inference import (
    TrainedModel,
    confusion_matrix,
    load_checkpoint,
    load_run,
    per_class_markdown,
    read_images,
)
from fmnas_jax.model import CheckpointError
from fmnas_jax.parallel import BucketPool, DevicePool, WorkerPool, cpu_workers
from fmnas_jax.report import Card, Row, plot_confusion, plot_curves, plot_search, write_card, write_csv
from fmnas_jax.search import hill_climb, table_climb
from fmnas_jax.search.base import ClimbResult
from fmnas_jax.store import CHECKPOINT, Store, flatten
from fmnas_jax.train import (
    TrainConfig,
    compiled_eval,
    evaluate_split,
    platform_summary,
    to_device,
)

log = logging.getLogger("fmnas_jax")
ACCELERATOR_SLOTS = 4  # evaluations in flight per GPU by default (unmeasured: see docs/benchmarks.md)


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


def evaluation_pool(cfg: AppConfig) -> tuple[WorkerPool | DevicePool | BucketPool | None, str]:
    """The fastest evaluation path for this platform, and a description for the log.

    Several CPU devices (JAX_NUM_CPU_DEVICES): one evaluation per device. Accelerators: several
    evaluations in flight per device (`workers` of them, default 4; a small CNN alone leaves a GPU
    idle between kernel launches, and compiles overlap too). One multi-core CPU: one single-threaded
    worker process per core. Otherwise, or workers=1: in-process. `batching=buckets` (opt-in):
    masked buckets on the first device.
    """
    backend, devices = jax.default_backend(), jax.devices()
    if cfg.batching == "buckets":
        pool = BucketPool(devices[0], cfg.bucket_size, cfg.bucket_waste)
        return pool, f"masked buckets of up to {cfg.bucket_size} genomes on {platform_summary()} (batching=buckets)"
    if cfg.workers == 1:
        return None, f"in-process on {platform_summary()} (workers=1)"
    if backend != "cpu":
        per_device = cfg.workers or ACCELERATOR_SLOTS
        pool = DevicePool(devices, per_device=per_device)
        return pool, f"{per_device} evaluations in flight on each of {len(devices)} device(s) ({platform_summary()}; workers=N to change)"
    if len(devices) > 1:
        pool = DevicePool(devices[: cfg.workers or len(devices)])
        return pool, f"{pool.n} devices, one evaluation on each at a time ({platform_summary()})"
    n = cfg.workers or cpu_workers()
    if n > 1:
        return WorkerPool(n, cfg.cache_dir), f"{n} worker processes, each pinned to one CPU core (workers=1 to disable)"
    return None, f"in-process on {platform_summary()}"


def _search(cfg: AppConfig, store: Store, parent: str, own: set[str], config_yaml: str, out_dir: Path) -> Card:
    rng = np.random.default_rng(cfg.search.seed)
    pool, path = evaluation_pool(cfg)
    log.info("evaluation path: %s", path)
    interrupted = False
    try:
        return _search_with(cfg, store, parent, own, config_yaml, out_dir, rng, pool)
    except BaseException:
        interrupted = True  # Ctrl-C or an error: stop the evaluations in flight instead of waiting for them
        raise
    finally:
        if pool is not None:
            pool.close(now=interrupted)


def _search_with(
    cfg: AppConfig,
    store: Store,
    parent: str,
    own: set[str],
    config_yaml: str,
    out_dir: Path,
    rng: np.random.Generator,
    pool: WorkerPool | DevicePool | BucketPool | None,
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
