"""The evaluator: the one place that decides whether a genome is trained or read back from MLflow.

Strategies only ever see a SearchObjective (genomes in, fitness values out); the evaluator
behind it owns the store, the trainer and the worker pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fmnas_jax import data as data_mod
from fmnas_jax.config import AppConfig
from fmnas_jax.genome import Genome, count_params
from fmnas_jax.inference import CHECKPOINT_ARTIFACT
from fmnas_jax.model import checkpoint_bytes
from fmnas_jax.parallel import BucketPool, DevicePool, WorkerPool
from fmnas_jax.search import fitness
from fmnas_jax.store import BUDGET_KEY, CHECKPOINT, DUPLICATE_OF, EVAL_KEY, GENOME, Store, flatten
from fmnas_jax.train import DeviceData, EvalResult, TrainConfig, to_device, train_and_evaluate

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
        pool: WorkerPool | DevicePool | BucketPool | None = None,
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
