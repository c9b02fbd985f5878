"""MLflow as the results store. The only module that imports mlflow.

Layout in MLflow: one experiment; a search is a parent run (tag fmnas.role=search); each
evaluation is a run (fmnas.role=evaluation) tagged with its genome, eval_key (genome +
everything that changes the result) and budget_key (eval_key without the genome), nested
under the search that trained it. Lookups are tag filters answered by the tracking
store's SQL, never a scan of runs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars say what runs

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking.context.registry import resolve_tags

log = logging.getLogger(__name__)

ROLE, GENOME, EVAL_KEY, BUDGET_KEY = "fmnas.role", "genome", "eval_key", "budget_key"
HOST, PID, REASON, DUPLICATE_OF = "fmnas.host", "fmnas.pid", "fmnas.reason", "fmnas.duplicate_of"
CHECKPOINT = "fmnas.checkpoint"  # artifact path of the saved weights
MODEL, MODEL_ARTIFACT = "fmnas.mlflow_model", "mlflow_model"  # the run's MLflow Model (pyfunc, models from code)
REGISTERED = "fmnas.registered_model"  # name/version in the model registry
IMAGE = 28
RUNG = "fmnas.rung"  # multi-fidelity searches: the rung (0 = cheapest budget) an evaluation belongs to
HEARTBEAT = "fmnas.heartbeat"  # unix seconds, refreshed by the process that owns a RUNNING run
REQUEST = "fmnas.request"  # a unique id per create_run call: a retried creation finds the run it already made
PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"
NOTE = "mlflow.note.content"  # a run's (or experiment's) description in the MLflow UI
PAGE = 1000  # search_runs' page limit
EXPERIMENT_KIND = "mlflow.experimentKind"
METRIC_DECIMALS = 6
SYSTEM_METRICS_STOP_SECONDS = {
    False: 30.0,
    True: 2.0,
}  # how long the system-metrics sampler may take to stop: after success, after an error


EXPERIMENT_NOTE = """Neural architecture search for Fashion-MNIST CNNs (fmnas_jax).

Runs by role (`tags.fmnas.role`): **search** (one per search: strategy, budget, the winner and its
result card in its description and `report/` artifacts), **evaluation** (one genome at one budget,
nested under the search that trained it; `tags.fmnas.rung` in multi-fidelity searches) and **final**
(a search's winner retrained; its MLflow Model is registered).

Compare within one search: filter `tags.mlflow.parentRunId = '<search run id>'`, then Chart view
(scatter of `params` against `val_accuracy`) or select runs and Compare (parallel coordinates).
Sorting by a metric flattens the nesting. Winners across searches: `tags.fmnas.role = 'final'`.
"""


class StoreError(RuntimeError):
    """The tracking location cannot be used."""


class ArtifactError(StoreError):
    """An artifact could not be written (artifact store full or unwritable); `run_id` is the run it was for."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclass(frozen=True)
class StoredEval:
    """A finished evaluation as read back from the store."""

    run_id: str
    genome: str
    eval_key: str
    metrics: dict[str, float]
    parent_run_id: str | None
    end_time: int = 0  # ms since the epoch

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


@dataclass(frozen=True)
class RunRecord:
    """One run as the rest of the package sees it (never an mlflow object)."""

    run_id: str
    name: str
    status: str
    role: str | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    parent_run_id: str | None
    start_time: int = 0  # ms since the epoch

    @property
    def checkpoint(self) -> str | None:
        """Artifact path of the saved weights, if the run kept them."""
        return self.tags.get(CHECKPOINT)

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)

    def int_param(self, name: str, default: int | None = None) -> int | None:
        """An integer param; absent (or logged as 'None' by older versions) gives `default`."""
        value = self.params.get(name)
        return default if value in (None, "None") else int(value)


def resolve_uri(uri: str | None, cwd: str | None = None) -> str:
    """Absolute tracking URI: None -> sqlite mlflow.db in `cwd`; relative sqlite paths made absolute."""
    base = Path(cwd or os.getcwd())
    if uri is None or uri == "":
        return f"sqlite:///{(base / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


# Errors that pass: SQLite writers contending (or a schema being created by another process) ...
_CONTENTION = ("locked", "busy", "duplicate column", "already exists")
# ... and a store that is unreachable for a while (tracking server restarting, its database restarting).
_UNREACHABLE = (
    "connection refused", "max retries exceeded", "connection aborted", "remotedisconnected", "remote end closed",
    "connection reset", "timed out", "too many 500", "too many 502", "too many 503", "too many 504", "bad gateway",
    "service unavailable", "server closed the connection", "could not connect", "connection to server",
    "terminating connection", "the database system is", "ssl syscall error", "broken pipe",
)  # fmt: skip


def transient_kind(error: BaseException) -> str | None:
    """'contention', 'unreachable' or None (an error that retrying cannot fix)."""
    text = str(error).lower()
    if any(t in text for t in _UNREACHABLE):
        return "unreachable"
    if any(t in text for t in _CONTENTION):
        return "contention"
    return None


def host_name() -> str:
    """This machine's name in run tags: $FMNAS_HOST if set (containers with random host names), else the host name."""
    return os.environ.get("FMNAS_HOST") or socket.gethostname()


class Store:
    """Results store on one MLflow tracking URI and experiment."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        *,
        retry_seconds: float = 300.0,
        heartbeat_seconds: float = 30.0,
        heartbeat_timeout: float = 600.0,
        system_metrics_seconds: float = 0.0,
    ) -> None:
        self.uri = resolve_uri(uri)
        self.system_metrics_seconds = system_metrics_seconds
        self.experiment_name = experiment
        self.retry_seconds, self.heartbeat_seconds, self.heartbeat_timeout = retry_seconds, heartbeat_seconds, heartbeat_timeout
        if self.uri.startswith("http"):
            # MLflow's own HTTP retries would block each call for minutes, silently; this class waits instead,
            # bounded by retry_seconds and saying so in the log. Users can still set these variables themselves.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        self._check_writable()
        self._owned: set[str] = set()  # RUNNING runs this process created and has not ended: they get heartbeats
        self._owned_lock = threading.Lock()
        self._last_end = 0  # ms: the end time given to the last run this process ended
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._gave_up: str | None = None  # the message, once this process has given up waiting for the store
        # What MLflow's fluent API records on every run: mlflow.user, mlflow.source.name/type, the git commit.
        self._context_tags = resolve_tags()
        with _schema_lock(_sqlite_path(self.uri)):
            self._create_sqlite_atomically()
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._retry(self._ensure_experiment, "opening the experiment")

    def _create_sqlite_atomically(self) -> None:
        """A new SQLite store is built under a temporary name and linked into place whole.

        MLflow creates its schema with ~50 migrations; two processes doing that on one file at once
        corrupt it for good (leftover _alembic_tmp_* tables). So no process of ours ever migrates a file
        another may be reading: others see either no database or a complete one (and wait, through
        _retry, while one that another tool is still creating reports an out-of-date schema).
        """
        db = _sqlite_path(self.uri)
        if db is None:
            return
        if db.exists():
            self._wait_for_schema(db)
            return
        tmp = db.with_name(f".{db.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.creating")
        try:
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
            os.link(tmp, db)  # fails if the file appeared meanwhile (another tool): then that one is used
        except FileExistsError:
            self._wait_for_schema(db)  # another tool created it meanwhile and may still be migrating it
        finally:
            tmp.unlink(missing_ok=True)

    def _wait_for_schema(self, db: Path) -> None:
        """Wait while another tool (an `mlflow ui`, a script) is still creating this SQLite store's schema.

        MLflow (re)creates the tables of a database that lacks any of them, so opening a file another
        process is still migrating would migrate it twice and corrupt it. The schema is complete when
        alembic_version holds MLflow's head revision and no _alembic_tmp_* table is left; a version that
        stays older than that for 10 s is an old store, which MLflow itself then reports.
        """
        import sqlite3

        head = _schema_head()
        deadline = time.monotonic() + min(self.retry_seconds, 120.0)
        state, last, since = "unreadable", None, time.monotonic()
        while time.monotonic() < deadline:
            try:
                with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    rows = con.execute("SELECT version_num FROM alembic_version").fetchall() if "alembic_version" in tables else []
                version = rows[0][0] if rows else None
                if version != last:
                    last, since = version, time.monotonic()
                settled = not any(t.startswith("_alembic_tmp") for t in tables)
                if settled and version is not None and (version == head or time.monotonic() - since > 10):
                    return
                state = "empty" if not tables else f"mid-migration (schema version {version}, MLflow's is {head})"
            except sqlite3.DatabaseError as e:
                state = f"unreadable ({e})"
            time.sleep(0.2)
        raise StoreError(f"tracking.uri {self.uri!r}: the SQLite store stayed {state}; if no other process is creating it, it is damaged")

    def _retry[T](self, fn: Callable[[], T], what: str) -> T:
        """Call `fn`, retrying while the store is contended or unreachable, for at most retry_seconds.

        Contention (SQLite writers, a schema being created) passes in milliseconds; an unreachable store
        (the tracking server or its database restarting) is waited for with a log line that says for
        how long; past the bound, StoreError names the URI (a rerun resumes from what was stored).
        """
        start, attempt, warned = time.monotonic(), 0, False
        while True:
            try:
                result = fn()
                if warned:
                    log.warning("tracking store %s answers again after %.0f s; going on", self.uri, time.monotonic() - start)
                return result
            except Exception as e:  # MlflowException, requests' and SQLAlchemy's errors all carry the text
                kind = transient_kind(e)
                waited = time.monotonic() - start
                if kind is None:
                    raise
                if self._gave_up is not None and kind == "unreachable":
                    raise StoreError(self._gave_up) from e  # clean-up calls on the way out do not wait a second time
                if waited >= self.retry_seconds:
                    self._gave_up = (
                        f"tracking store {self.uri} unusable for {waited:.0f} s while {what} "
                        f"(tracking.retry_seconds={self.retry_seconds:g}): {_first_line(e)}. "
                        "When it is back, run the same command again: finished evaluations are reused."
                    )
                    raise StoreError(self._gave_up) from e
                if kind == "unreachable" and not warned:
                    log.warning(
                        "tracking store %s unreachable while %s (%s); waiting for it, for up to %.0f s more (tracking.retry_seconds)",
                        self.uri, what, _first_line(e), self.retry_seconds - waited,
                    )  # fmt: skip
                    warned = True
                log.debug("retrying %s after %s", what, e)
                time.sleep(min(0.05 * 2**attempt, 5.0, max(self.retry_seconds - waited, 0.01)))
                attempt += 1

    def _check_writable(self) -> None:
        db = _sqlite_path(self.uri)
        if db is None:
            return
        if not db.parent.is_dir():
            raise StoreError(f"tracking.uri {self.uri!r}: folder {str(db.parent)!r} does not exist")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise StoreError(f"tracking.uri {self.uri!r}: {str(db)!r} is not writable; choose a writable tracking.uri")

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise StoreError(f"experiment {self.experiment_name!r} is deleted in {self.uri}; restore it or pick another name")
            return exp.experiment_id
        db = _sqlite_path(self.uri)
        # Artifacts beside the database, so the store does not depend on the launch directory.
        location = (db.parent / "mlartifacts").as_uri() if db else None
        try:
            # The kind tag makes the MLflow UI open the experiment on its runs ("Model training"), not the GenAI view.
            return self.client.create_experiment(
                self.experiment_name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development", NOTE: EXPERIMENT_NOTE}
            )
        except MlflowException:
            exp = self.client.get_experiment_by_name(self.experiment_name)  # another process won the race
            if exp is None:
                raise
            return exp.experiment_id

    def ui_link(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        """Where `mlflow ui` (or the tracking server) shows this experiment's runs table, in model-training mode."""
        base = self.uri.rstrip("/") if self.uri.startswith("http") else f"http://{host}:{port}"
        return f"{base}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    # -- reading ------------------------------------------------------------------

    def _search(self, filter_string: str, order_by: list[str] | None = None, max_results: int | None = None) -> list:
        runs, token = [], None
        while True:
            page = self._retry(
                lambda t=token: self.client.search_runs(
                    [self.experiment_id], filter_string, ViewType.ACTIVE_ONLY, PAGE, order_by, page_token=t
                ),
                "searching runs",
            )
            runs += list(page)
            token = page.token
            if not token or (max_results and len(runs) >= max_results):
                return runs[:max_results] if max_results else runs

    @staticmethod
    def _stored(run: Any) -> StoredEval:
        tags = run.data.tags
        return StoredEval(run.info.run_id, tags[GENOME], tags[EVAL_KEY], dict(run.data.metrics), tags.get(PARENT), run.info.end_time or 0)

    def find_finished(self, eval_key: str, role: str = "evaluation") -> StoredEval | None:
        """The authoritative (earliest) FINISHED run of `role` for `eval_key`, or None."""
        runs = self._search(
            f"tags.{EVAL_KEY} = '{eval_key}' AND attributes.status = 'FINISHED' AND tags.`{ROLE}` = '{role}'",
            ["attributes.start_time ASC"],
            max_results=1,
        )
        return self._stored(runs[0]) if runs else None

    def finished_evaluations(self, budget_key: str | None = None, role: str = "evaluation") -> list[StoredEval]:
        """Every FINISHED run of `role` (of one budget, if given), one per eval_key, earliest first."""
        f = f"attributes.status = 'FINISHED' AND tags.`{ROLE}` = '{role}'"
        if budget_key:
            f += f" AND tags.{BUDGET_KEY} = '{budget_key}'"
        out: dict[str, StoredEval] = {}
        for run in self._search(f, ["attributes.start_time ASC"]):
            s = self._stored(run)
            out.setdefault(s.eval_key, s)
        return list(out.values())

    def finished_runs(self, role: str, genome: str) -> list[RunRecord]:
        """FINISHED runs of one role and genome (e.g. a winner's final retrains), earliest first."""
        f = f"attributes.status = 'FINISHED' AND tags.`{ROLE}` = '{role}' AND tags.{GENOME} = '{genome}'"
        return [self._record(r) for r in self._search(f, ["attributes.start_time ASC"])]

    def cost_samples(self, host: str, limit: int = 500) -> list[tuple[str, int, float, float]]:
        """(genome, images trained, wall seconds, train seconds) of this host's latest finished evaluations (for the cost model)."""
        f = f"attributes.status = 'FINISHED' AND tags.`{HOST}` = '{host}' AND metrics.wall_seconds > 0"  # evaluations and finals
        runs = self._search(f, ["attributes.start_time DESC"], max_results=limit)
        return [(r.data.tags[GENOME], int(r.data.metrics.get("images_trained", 0)), r.data.metrics["wall_seconds"],
                 r.data.metrics.get("train_seconds", 0.0)) for r in reversed(runs)]  # fmt: skip

    def running_elsewhere(self, budget_key: str, role: str = "evaluation") -> dict[str, str]:
        """eval_key -> run id of this budget's RUNNING runs that another live process owns (fresh heartbeat)."""
        f = f"attributes.status = 'RUNNING' AND tags.`{ROLE}` = '{role}' AND tags.{BUDGET_KEY} = '{budget_key}'"
        return {r.data.tags[EVAL_KEY]: r.info.run_id for r in self._search(f) if self._live_elsewhere(r)}

    def is_live(self, run_id: str) -> bool:
        """Whether the run is still RUNNING under a live owner (its heartbeat is fresh)."""
        return self._live_elsewhere(self._retry(lambda: self.client.get_run(run_id), "reading a run"))

    def _live_elsewhere(self, run: Any) -> bool:
        tags = run.data.tags
        if run.info.status != "RUNNING" or (tags.get(HOST) == host_name() and tags.get(PID) == str(os.getpid())):
            return False
        return time.time() - _heartbeat(run) <= self.heartbeat_timeout

    def run_ids(self, role: str, tag: str, value: str) -> set[str]:
        """Ids of runs of one role with tag == value (any status)."""
        return {r.info.run_id for r in self._search(f"tags.`{ROLE}` = '{role}' AND tags.`{tag}` = '{value}'")}

    # -- writing ------------------------------------------------------------------

    def start_run(self, name: str, role: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        """Create a RUNNING run owned by this process (heartbeats from now until end_run); returns its id."""
        request = uuid.uuid4().hex
        all_tags = {**self._context_tags, RUN_NAME: name, ROLE: role, HOST: host_name(), PID: str(os.getpid()),
                    HEARTBEAT: str(int(time.time())), REQUEST: request, **tags}  # fmt: skip
        if parent_run_id:
            all_tags[PARENT] = parent_run_id
        tried = False

        def create() -> str:  # idempotent: a retry after a lost answer finds the run the first call made
            nonlocal tried
            if tried:
                made = self.client.search_runs([self.experiment_id], f"tags.`{REQUEST}` = '{request}'", max_results=1)
                if made:
                    return made[0].info.run_id
            tried = True
            return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

        run_id = self._retry(create, "creating a run")
        with self._owned_lock:
            self._owned.add(run_id)
        self._start_heartbeat()
        return run_id

    @contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU if any) on
        `run_id` every `system_metrics_seconds` while the block runs; 0 turns them off."""
        if self.system_metrics_seconds <= 0:
            yield
            return
        monitor = SystemMetricsMonitor(run_id, sampling_interval=self.system_metrics_seconds, tracking_uri=self.uri)
        monitor.start()
        interrupted = True
        try:
            yield
            interrupted = False
        finally:
            # MLflow's finish() joins its sampling thread, which may be inside a store call; never let that hold up
            # the job's exit (Ctrl-C must stop a search at once): stop it from a daemon thread, waiting a bounded time.
            stopper = threading.Thread(target=monitor.finish, name="fmnas-system-metrics-stop", daemon=True)
            stopper.start()
            stopper.join(SYSTEM_METRICS_STOP_SECONDS[interrupted])

    def _start_heartbeat(self) -> None:
        if self._beat_thread is None:
            self._beat_thread = threading.Thread(target=self._beat, name="fmnas-heartbeat", daemon=True)
            self._beat_thread.start()

    def _beat(self) -> None:
        """Refresh the heartbeat tag of this process's RUNNING runs; a missed beat (store down) is only logged."""
        while not self._beat_stop.wait(self.heartbeat_seconds):
            with self._owned_lock:
                owned = list(self._owned)
            stamp = str(int(time.time()))
            for run_id in owned:
                try:
                    self.client.set_tag(run_id, HEARTBEAT, stamp)
                except Exception as e:
                    log.debug("heartbeat of run %s missed: %s", run_id, _first_line(e))

    def close(self) -> None:
        """Stop the heartbeat thread (the process's runs should have ended)."""
        self._beat_stop.set()

    def start_evaluation(
        self,
        genome: str,
        eval_key: str,
        budget_key: str,
        parent_run_id: str | None,
        params: dict[str, Any],
        rung: int | None = None,
        role: str = "evaluation",
        name: str | None = None,
        description: str | None = None,
        datasets: Sequence[Any] = (),
    ) -> str:
        """A RUNNING run of `genome` (an evaluation, or a search's retrained winner: role 'final') with its keys,
        params, fidelity rung, a markdown description and the data splits it uses (`data.SplitRecord`s); returns its id."""
        tags = {GENOME: genome, EVAL_KEY: eval_key, BUDGET_KEY: budget_key} | ({RUNG: str(rung)} if rung is not None else {})
        if description:
            tags[NOTE] = description
        run_id = self.start_run(name or genome, role, tags, parent_run_id)
        self.log(run_id, params=params)
        if datasets:
            self.log_datasets(run_id, datasets)
        return run_id

    def log_datasets(self, run_id: str, splits: Sequence[Any]) -> None:
        """Record the splits a run uses as MLflow dataset inputs (the UI's Dataset column and filter)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(s.name, s.digest, s.source_type, json.dumps({"uri": s.source}), profile=json.dumps({"num_rows": s.rows})),
                [InputTag("mlflow.data.context", s.context)],
            )
            for s in splits
        ]
        self._retry(lambda: self.client.log_inputs(run_id, datasets=inputs), "logging the datasets")

    def describe(self, run_id: str, markdown: str) -> None:
        """Set the run's description (shown on its page in the MLflow UI)."""
        self.log(run_id, tags={NOTE: markdown})

    def mark_duplicate(self, run_id: str, of_run_id: str) -> None:
        """Tag a run that repeated an evaluation another process finished first."""
        self.log(run_id, tags={DUPLICATE_OF: of_run_id})

    def save_checkpoint(self, run_id: str, blob: bytes, artifact: str) -> None:
        """Store the weights as artifact `artifact` of the run and point the checkpoint tag at it."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact).name
            path.write_bytes(blob)
            self.log_file(run_id, path, str(Path(artifact).parent))
        self.log(run_id, tags={CHECKPOINT: artifact})

    def log_model(self, run_id: str, checkpoint: bytes, register_as: str | None, tags: dict[str, str]) -> str | None:
        """Log the run's weights as an MLflow Model (artifact `mlflow_model`: models from code, nothing pickled)
        and, if `register_as` is set, register it as a new version with `tags`; returns the version."""
        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        import fmnas_jax

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE, IMAGE))]),  # unnamed: one array in, one out
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        )
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "checkpoint.msgpack"
            weights.write_bytes(checkpoint)
            path = Path(tmp) / MODEL_ARTIFACT
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")  # the signature validates
                try:
                    mlflow.pyfunc.save_model(
                        path, python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts={"checkpoint": str(weights)},
                        code_paths=[str(Path(fmnas_jax.__file__).parent)], signature=signature,
                        input_example=np.zeros((2, IMAGE, IMAGE), np.uint8), pip_requirements=_model_requirements(),
                    )  # fmt: skip
                except OSError as e:
                    raise ArtifactError(f"could not write the MLflow Model of run {run_id}: {_first_line(e)}", run_id) from e
            with self._artifact_errors(run_id, MODEL_ARTIFACT):
                self._retry(lambda: self.client.log_artifacts(run_id, str(path), MODEL_ARTIFACT), "storing the model")
        self.log(run_id, tags={MODEL: MODEL_ARTIFACT})
        if not register_as:
            return None
        self._retry(lambda: _ensure_registered_model(self.client, register_as), "creating the registered model")
        version = self._retry(
            lambda: self.client.create_model_version(register_as, f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags,
                                                     description=tags.get("genome")),
            "registering the model",
        )  # fmt: skip
        self.log(run_id, tags={REGISTERED: f"{register_as}/{version.version}"})
        log.info("registered the model of run %s as %s version %s (models:/%s/%s)", run_id, register_as, version.version,
                 register_as, version.version)  # fmt: skip
        return str(version.version)

    def log(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """Log finite metrics, params (None ones left out) and tags, in batches within log_batch's limits."""
        now = int(time.time() * 1000)
        ms = [Metric(k, as_logged(v), now, step) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))]
        ps = [Param(k, str(v)) for k, v in (params or {}).items() if v is not None]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for kind, items, size in (("metrics", ms, 1000), ("params", ps, 100), ("tags", ts, 100)):
            for i in range(0, len(items), size):
                part = {kind: items[i : i + size]}
                self._retry(lambda p=part: self.client.log_batch(run_id, **p), "logging to a run")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with self._artifact_errors(run_id, artifact_file):
            self._retry(lambda: self.client.log_text(run_id, text, artifact_file), "storing an artifact")

    def log_file(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with self._artifact_errors(run_id, str(Path(artifact_path or "") / Path(path).name)):
            self._retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path), "storing an artifact")

    @contextmanager
    def _artifact_errors(self, run_id: str, name: str) -> Iterator[None]:
        """A full or unwritable artifact store as ArtifactError naming the run, the file and where it was going."""
        try:
            yield
        except (OSError, MlflowException) as e:
            try:
                where = self.client.get_run(run_id).info.artifact_uri
            except Exception:
                where = "the artifact store"
            raise ArtifactError(
                f"could not store artifact {name!r} of run {run_id} in {where}: {_first_line(e)}. "
                "Free space there (or make it writable) and run the same command again: finished evaluations are reused.",
                run_id,
            ) from e

    def end_run(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        """End a run as FINISHED, FAILED or KILLED; a reason goes into the fmnas.reason tag."""
        if reason:
            self._retry(lambda: self.client.set_tag(run_id, REASON, reason[:8000]), "tagging a run")
        with self._owned_lock:  # end times strictly increase within a process: a replay orders results by them
            self._last_end = end = max(int(time.time() * 1000), self._last_end + 1)
        self._retry(lambda: self.client.set_terminated(run_id, status, end_time=end), "ending a run")
        with self._owned_lock:
            self._owned.discard(run_id)

    def end_run_on_the_way_out(self, run_id: str, status: str, reason: str) -> None:
        """end_run for clean-up after an error: a store that is down only gets a log line (the run is reaped later)."""
        try:
            self.end_run(run_id, status, reason)
        except StoreError as e:
            log.warning("could not mark run %s %s (%s); the next job to open the store will reap it", run_id, status, e)

    def download(self, run_id: str, path: str, dst: str) -> str:
        """Download one artifact of a run into `dst`; returns the local path."""
        return self._retry(lambda: self.client.download_artifacts(run_id, path, dst), "downloading an artifact")

    def get_run(self, run_id: str) -> RunRecord:
        """The run's record; StoreError if there is no such run."""
        try:
            run = self._retry(lambda: self.client.get_run(run_id), "reading a run")
        except MlflowException as e:
            raise StoreError(f"run {run_id!r} not found in {self.uri}: {e.message}") from e
        return self._record(run)

    @staticmethod
    def _record(run: Any) -> RunRecord:
        tags = dict(run.data.tags)
        return RunRecord(run.info.run_id, run.info.run_name, run.info.status, tags.get(ROLE), tags, dict(run.data.params),
                         dict(run.data.metrics), tags.get(PARENT), run.info.start_time or 0)  # fmt: skip

    # -- recovery -----------------------------------------------------------------

    def reap_orphans(self, alive: Callable[[int], bool] | None = None) -> list[str]:
        """Mark RUNNING runs whose owner is gone KILLED, with the reason; returns their ids.

        Gone: a dead process on this host (checked by pid), or, on any host, no heartbeat for
        heartbeat_timeout seconds (a job killed or requeued on another machine cannot be checked by pid).
        This process's own runs are never touched.
        """
        alive = alive or _pid_alive
        host, now, reaped = host_name(), time.time(), []
        for run in self._search("attributes.status = 'RUNNING'"):
            tags = run.data.tags
            owner_host, pid = tags.get(HOST), tags.get(PID, "")
            if owner_host == host and pid == str(os.getpid()):
                continue
            beat = _heartbeat(run)
            if owner_host == host and pid.isdigit() and not alive(int(pid)):
                reason = f"process {pid} on {host} died before finishing this run"
            elif now - beat > self.heartbeat_timeout:
                reason = (f"no heartbeat from process {pid or '?'} on {owner_host or '?'} for {now - beat:.0f} s "
                          f"(tracking.heartbeat_timeout={self.heartbeat_timeout:g}): its job was killed or requeued")  # fmt: skip
            else:
                continue
            self.end_run(run.info.run_id, "KILLED", reason)
            reaped.append(run.info.run_id)
        return reaped


@functools.cache
def _schema_head() -> str:
    """The schema revision this MLflow version creates (its alembic migrations' head)."""
    import mlflow.store
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(Path(mlflow.store.__file__).parent / "db_migrations")).get_current_head()


def _heartbeat(run: Any) -> float:
    """When the run's owner last showed it was alive (unix seconds): its heartbeat tag, else its start."""
    beat = run.data.tags.get(HEARTBEAT, "")
    return float(beat) if beat.isdigit() else run.info.start_time / 1000


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description="Fashion-MNIST CNNs found by fmnas_jax: input (N, 28, 28) uint8 pixels, output class ids 0-9."
        )
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise


def _model_requirements() -> list[str]:
    """What the model needs beyond its code (fmnas_jax travels inside it): the installed versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("jax", "jaxlib", "flax", "optax", "numpy", "mlflow")]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


@contextmanager
def _schema_lock(db: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on the database's folder while this process opens a SQLite store (no-op otherwise)."""
    if db is None or not db.parent.is_dir():
        yield
        return
    import fcntl

    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def as_logged(value: float) -> float:
    """A metric as the store keeps it: six decimals, so accuracies read 0.8953, not float32's 0.89529997."""
    return round(float(value), METRIC_DECIMALS)


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """{'a': 1} -> {'prefix.a': 1}, recursively."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(key, v) if isinstance(v, dict) else {key: v})
    return out
