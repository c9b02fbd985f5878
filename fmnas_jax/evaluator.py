"""The evaluator: the one place that decides whether a genome is trained or read back from MLflow.

It owns the keys that make a result reusable, the store lookups, and each evaluation run's life
(RUNNING -> FINISHED/FAILED/KILLED). Training itself happens on a `Backend`. Strategies never see
it: they call a `SearchObjective` (fmnas_jax.objective), which asks the evaluator.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fmnas_jax.backends import Backend, EvalSpec
from fmnas_jax.checkpoint import checkpoint_bytes
from fmnas_jax.config import check_model_name
from fmnas_jax.data import DataConfig, Normalisation, data_info, split_records
from fmnas_jax.genome import Genome
from fmnas_jax.store import RAY_NODE, ArtifactError, Store, StoredEval, as_logged, flatten
from fmnas_jax.train import EvalResult, TrainConfig

log = logging.getLogger("fmnas_jax")
# Bump when the trainer or model changes what a setting produces. 2: optax-native optimiser state
# and the recipe settings (augmentation, label smoothing) in the key. 3: the step composed of shared
# pieces (fmnas_jax.programs) and a host-side cosine schedule: the same arithmetic, other float rounding.
EVAL_VERSION = 3


def budget_key(spec: EvalSpec) -> str:
    """Hash of everything besides the genome that changes an evaluation's result."""
    blob = {"v": EVAL_VERSION, "trainer": spec.trainer.result_settings(), "data": spec.data.result_settings(), "seed": spec.seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def eval_key(genome: Genome | str, budget: str) -> str:
    """Hash of genome + budget: equal keys mean equal results (on one platform)."""
    return hashlib.sha256(f"{budget}|{genome}".encode()).hexdigest()[:16]


def describe_budget(trainer: TrainConfig, data: DataConfig) -> str:
    """One line for logs and cards: epochs, images, batch, learning rate, recipe."""
    train = "all" if data.train_size is None else f"{data.train_size:,}"
    epochs = f"{trainer.epochs} epoch{'s' * (trainer.epochs != 1)}"
    recipe = [f"crop {trainer.augment_crop}"] * bool(trainer.augment_crop) + ["flip"] * trainer.augment_flip
    recipe += [f"label smoothing {trainer.label_smoothing:g}"] * bool(trainer.label_smoothing)
    recipe += [f"{trainer.optimizer} wd {trainer.weight_decay:g}"] * (trainer.optimizer == "adamw")
    extra = f", {', '.join(recipe)}" if recipe else ""
    return f"{epochs}, {train} training images, val {data.val_size:,}, batch {trainer.batch_size}, lr {trainer.learning_rate}{extra}"


@dataclass
class Outcome:
    """One genome's evaluation as the search sees it: trained now or read back from the store."""

    genome: Genome
    eval_key: str
    run_id: str
    status: str
    metrics: dict[str, float]
    reused: bool
    history: dict[str, list[float]] = field(default_factory=dict)
    variables: Any = None
    parent_run_id: str | None = None
    normalisation: Normalisation | None = None
    end_time: int = 0  # ms since the epoch when its run ended (a stored result: replays keep the order results arrived in)

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


OnEpoch = Callable[[Genome, int, dict[str, float]], None]
Admit = Callable[[Genome, "Outcome | None"], bool]


class Evaluator:
    """Trains a genome unless the store already has a FINISHED run with the same eval_key."""

    def __init__(
        self,
        store: Store,
        spec: EvalSpec,
        backend: Backend,
        parent_run_id: str | None = None,
        on_epoch: OnEpoch | None = None,
        rung: int | None = None,
        role: str = "evaluation",
        register_as: str | None = None,
    ) -> None:
        self.store, self.spec, self.backend, self.parent_run_id = store, spec, backend, parent_run_id
        self.on_epoch, self.rung, self.role = on_epoch, rung, role  # role 'final': a search's retrained winner
        self.register_as = register_as  # runs that keep their weights: registered model name (None: log the model only)
        check_model_name(register_as, "register_as")  # the CLI's check of registry.model_name, for library callers too
        self.budget = budget_key(spec)
        self.known: dict[str, StoredEval] = {s.eval_key: s for s in store.finished_evaluations(self.budget, role)}
        self.trained = self.reused = self.failed = 0
        self.poll_seconds = 2.0  # how often to look for an evaluation another process is running

    def lookup(self, genome: Genome) -> Outcome | None:
        """A stored FINISHED result for this genome and budget, if any (cheap: dict, then one SQL query)."""
        key = eval_key(genome, self.budget)
        stored = self.known.get(key) or self.store.find_finished(key, self.role)
        if stored is None:
            return None
        self.known[key] = stored
        return Outcome(genome, key, stored.run_id, "FINISHED", stored.metrics, reused=True, parent_run_id=stored.parent_run_id,
                       end_time=stored.end_time)  # fmt: skip

    def finished(self, parse: Callable[[str], Genome | None]) -> list[Outcome]:
        """Every FINISHED result of this budget and role the store holds now, as Outcomes (earliest first), for
        genomes `parse` accepts (it returns None for one outside the caller's space)."""
        out = []
        for s in self.store.finished_evaluations(self.budget, self.role):
            genome = parse(s.genome)
            if genome is not None:
                self.known.setdefault(s.eval_key, s)
                out.append(Outcome(genome, s.eval_key, s.run_id, "FINISHED", s.metrics, True, parent_run_id=s.parent_run_id,
                                   end_time=s.end_time))  # fmt: skip
        return out

    def record_fitness(self, outcome: Outcome, fitness: float) -> None:
        """Log on a new evaluation's run the fitness its search ranks it by (the UI's `fitness` column)."""
        if not outcome.reused and outcome.status == "FINISHED" and math.isfinite(fitness):
            self.store.log(outcome.run_id, metrics={"fitness": fitness})

    def counts(self) -> dict[str, int]:
        """Evaluations this evaluator trained, reused from the store, and saw fail."""
        return {"trained": self.trained, "reused": self.reused, "failed": self.failed}

    def running_elsewhere(self) -> dict[str, str]:
        """eval_key -> run id of this budget's evaluations another live process is training now."""
        return self.store.running_elsewhere(self.budget, self.role)

    def is_live(self, run_id: str) -> bool:
        return self.store.is_live(run_id)

    def start(self, genome: Genome) -> str:
        """Open the RUNNING run of a genome about to train here; returns its id."""
        return self._start(genome)

    def epoch_logger(self, genome: Genome, run_id: str) -> Callable[[int, dict[str, float]], None]:
        """The callback that logs one run's per-epoch metrics as they stream in."""
        log_epoch = self._epoch_logger({genome: run_id})
        return lambda epoch, row: log_epoch(genome, epoch, row)

    def finish(self, genome: Genome, run_id: str, result: EvalResult) -> Outcome:
        """Log a result to its run and end it FINISHED or FAILED; the Outcome the search sees."""
        return self._finish(genome, run_id, result)

    def kill(self, run_id: str) -> None:
        """Mark a run this evaluator started KILLED (its evaluation was interrupted)."""
        self.store.end_run_on_the_way_out(run_id, "KILLED", "interrupted before this evaluation finished")

    def reused_one(self, outcome: Outcome) -> None:
        """Count a stored result handed to the search (the scheduler looked it up itself)."""
        self.reused += 1

    def evaluate(self, genome: Genome) -> Outcome:
        """Reuse or train one genome; a failure (NaN, exception) comes back FAILED, not raised."""
        return self.evaluate_many([genome])[genome]

    def evaluate_many(
        self, genomes: Sequence[Genome], admit: Admit | None = None, on_done: Callable[[Outcome], None] | None = None
    ) -> dict[Genome, Outcome]:
        """Reuse or train each distinct genome that `admit(genome, stored or None)` lets through (all by default).

        Misses train on the backend; `on_done` sees every outcome as it is ready. Returns genome -> outcome.
        """
        done: dict[Genome, Outcome] = {}
        pending: list[Genome] = []
        for g in dict.fromkeys(genomes):
            found = self.lookup(g)
            if admit is not None and not admit(g, found):
                continue
            if found is None:
                pending.append(g)
                continue
            self._reuse(found, done, on_done)
        # Genomes another live process (this host or another) is training right now are waited for, not repeated.
        claimed = self.store.running_elsewhere(self.budget, self.role) if pending else {}
        others = {g: claimed[eval_key(g, self.budget)] for g in pending if eval_key(g, self.budget) in claimed}
        others |= self._train([g for g in pending if g not in others], done, on_done)
        while others:
            others = self._train(self._await(others, done, on_done), done, on_done)
        return done

    def _train(self, genomes: list[Genome], done: dict[Genome, Outcome], on_done: Callable[[Outcome], None] | None) -> dict[Genome, str]:
        """Train `genomes` on the backend, as many at a time as it runs. A genome's run opens when it is submitted (RUNNING
        in the UI, and the claim other processes see), not while it waits its turn; one that another process finished
        or claimed meanwhile is left to it. Returns those claimed elsewhere (genome -> their run id)."""
        queued, runs, claimed = collections.deque(genomes), {}, {}
        on_epoch, in_flight, first = self._epoch_logger(runs), 0, True
        try:
            while queued or in_flight:
                while queued and in_flight < max(1, self.backend.parallelism):
                    g = queued.popleft()
                    if not first and self._taken(g, done, on_done, claimed):
                        continue
                    runs[g] = self._start(g)  # RUNNING in the UI from now on
                    self.backend.submit(g, g, self.spec, lambda epoch, row, g=g: on_epoch(g, epoch, row))
                    in_flight += 1
                first = False
                if not in_flight:
                    break
                result = self.backend.next_result()
                assert result is not None, "a submitted evaluation was lost"
                g, r = result
                in_flight -= 1
                done[g] = self._finish(g, runs[g], r)
                if on_done is not None:
                    on_done(done[g])
        except BaseException as e:
            ended = getattr(e, "run_id", None)  # an ArtifactError's run is already FAILED with its reason
            for g, run_id in runs.items():
                if g not in done and run_id != ended:
                    self.store.end_run_on_the_way_out(run_id, "KILLED", "interrupted before this evaluation finished")
            raise
        return claimed

    def _taken(self, genome: Genome, done: dict[Genome, Outcome], on_done: Callable[[Outcome], None] | None, claimed: dict) -> bool:
        """Whether another process finished `genome` (its result reused) or is training it (claimed) since the batch began."""
        found = self.lookup(genome)
        if found is not None:
            self._reuse(found, done, on_done)
            return True
        run_id = self.store.running_elsewhere(self.budget, self.role).get(eval_key(genome, self.budget))
        if run_id is not None:
            claimed[genome] = run_id
        return run_id is not None

    def _reuse(self, found: Outcome, done: dict[Genome, Outcome], on_done: Callable[[Outcome], None] | None) -> None:
        """Hand a stored result to the search instead of training its genome."""
        self.reused += 1
        done[found.genome] = found
        if on_done is not None:
            on_done(found)

    def _await(self, others: dict[Genome, str], done: dict[Genome, Outcome], on_done: Callable[[Outcome], None] | None) -> list[Genome]:
        """Wait for evaluations other processes are running; returns those they abandoned (to train here)."""
        log.info("waiting for %d evaluation(s) another process is running: %s", len(others), ", ".join(map(str, others)))
        abandoned: list[Genome] = []
        waiting = dict(others)
        while waiting:
            time.sleep(self.poll_seconds)
            for g, run_id in list(waiting.items()):
                found = self.lookup(g)
                if found is not None:
                    self._reuse(found, done, on_done)
                elif not self.store.is_live(run_id):
                    abandoned.append(g)  # it failed, was killed, or its owner stopped beating
                else:
                    continue
                del waiting[g]
        return abandoned

    def _epoch_logger(self, runs: dict[Genome, str]) -> OnEpoch:
        def on_epoch(genome: Genome, epoch: int, row: dict[str, float]) -> None:
            self.store.log(runs[genome], metrics=row, step=epoch)
            if self.on_epoch is not None:
                self.on_epoch(genome, epoch, row)

        return on_epoch

    def _start(self, genome: Genome) -> str:
        key = eval_key(genome, self.budget)
        # What tells runs apart first (the UI's name column shows ~14 characters): role or rung, then the genome.
        prefix = "eval" if self.rung is None else f"r{self.rung}"
        prefix = "final" if self.role == "final" else prefix
        name = f"{prefix} {genome.short}"
        description = self._description(genome, key)
        datasets = split_records(self.spec.data, self.spec.seed, self.spec.test)
        return self.store.start_evaluation(str(genome), key, self.budget, self.parent_run_id, self._params(genome), self.rung, self.role,
                                           name, description, datasets)  # fmt: skip

    def _description(self, genome: Genome, key: str, trained: int | None = None) -> str:
        """The run's description; `trained`: the epochs it trained when a deadline cut its budget short."""
        rung = f" (rung {self.rung})" if self.rung is not None else ""
        what = "The search's winner, retrained with the final recipe" if self.role == "final" else f"An evaluation{rung}"
        budget = describe_budget(self.spec.trainer, self.spec.data)
        if trained is not None:
            budget = (f"{budget} planned; **trained {trained} epoch{'s' * (trained != 1)}**: the rest would have run past "
                      "search.time_budget, and the learning-rate schedule was re-planned to them (metric `epochs_trained`)")  # fmt: skip
        return (f"{what}.\n\n`{genome}`\n\nBudget: {budget}; seed {self.spec.seed}. "
                f"eval_key `{key}`: a later search with the same genome and budget reuses this run.")  # fmt: skip

    def _params(self, genome: Genome) -> dict[str, Any]:
        genes: dict[str, Any] = {}
        for i, c in enumerate(genome.convs, start=1):
            genes |= {
                f"layer{i}.type": c.kind,
                f"layer{i}.filters": c.filters,
                f"layer{i}.kernel": c.kernel,
                f"layer{i}.activation": c.activation,
            }
        genes["head.activation"] = genome.head_activation
        settings = {"trainer": self.spec.trainer.result_settings(), "data": self.spec.data.result_settings(), "seed": self.spec.seed}
        return genes | flatten("", settings)

    def _finish(self, genome: Genome, run_id: str, result: EvalResult) -> Outcome:
        key = eval_key(genome, self.budget)
        summary = {k: as_logged(v) for k, v in result.summary().items()}  # what a later reuse will read back
        per_epoch = set(result.history)  # already logged at steps 1..epochs; the last value is the final one
        trained = len(result.history.get("train_loss", []))
        budget = {"budget_epochs": self.spec.trainer.epochs, "budget_images": self.spec.trainer.epochs * self.spec.data.n_train}
        done = {"epochs_trained": float(trained)}  # fewer than budget_epochs: a deadline cut it (InProcess(deadline=...))
        where = {RAY_NODE: result.node} if result.node else None
        one_off = {k: v for k, v in summary.items() if k not in per_epoch} | budget | done
        curves = [] if self.backend.streams_epochs else _rows(result.history)  # arriving whole from a worker: logged now
        self.store.log(run_id, metrics=one_off, tags=where, history=curves)
        if result.status == "FINISHED" and trained < self.spec.trainer.epochs:  # what it did, beside what it planned
            self.store.describe(run_id, self._description(genome, key, trained))
        if result.status == "FINISHED":
            earlier = self.store.find_finished(key, self.role)  # another process may have finished it meanwhile
            if earlier is not None and earlier.run_id != run_id:
                self.store.mark_duplicate(run_id, earlier.run_id)
            if result.variables is not None:
                info = data_info(self.spec.data)
                blob = checkpoint_bytes(genome, result.variables, result.normalisation, info.image, info.class_names)
                try:
                    scores = {k: f"{summary[k]:.4f}" for k in ("val_accuracy", "test_accuracy", "train_accuracy") if k in summary}
                    tags = {"genome": str(genome), "run_id": run_id, "param_count": str(result.param_count), **scores}
                    image = info.image
                    shape = (image.height, image.width) if image.channels == 1 else (image.height, image.width, image.channels)
                    self.store.log_model(run_id, blob, self.register_as, tags, shape)
                except ArtifactError as e:  # disk full, artifact store unwritable: never FINISHED without its weights
                    self.store.end_run(run_id, "FAILED", f"the weights could not be stored: {e}")
                    log.error("evaluation of %s FAILED: its weights could not be stored: %s", genome, e)
                    raise
            self.store.end_run(run_id, "FINISHED")
            self.trained += 1
            log.info(
                "trained %s: %d params, val %.4f, test %s (train %.1f s at %.0f img/s; compile %.1f s, %d cache hits)",
                genome, result.param_count, result.val_accuracy,
                f"{result.test_accuracy:.4f}" if math.isfinite(result.test_accuracy) else "not measured at this rung", result.train_seconds,
                result.images_per_second, result.compile_seconds, result.cache_hits,
            )  # fmt: skip
        else:
            self.store.end_run(run_id, "FAILED", result.reason)
            self.failed += 1
            log.warning("evaluation of %s FAILED: %s", genome, result.reason)
        return Outcome(genome, key, run_id, result.status, summary | done, False, result.history, result.variables,
                       normalisation=result.normalisation)  # fmt: skip


def _rows(history: dict[str, list[float]]) -> list[dict[str, float]]:
    """Per-epoch rows from a history of columns."""
    n = len(history.get("train_loss", []))
    return [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(n)]
