"""MLflow as the results store. The only module that imports mlflow.

Layout in MLflow: one experiment; a search is a parent run (tag fmnas.role=search); each
evaluation is a run (fmnas.role=evaluation) tagged with its genome, eval_key (genome +
everything that changes the result) and budget_key (eval_key without the genome), nested
under the search that trained it. Lookups are tag filters answered by the tracking
store's SQL, never a scan of runs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars say what runs

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

ROLE, GENOME, EVAL_KEY, BUDGET_KEY = "fmnas.role", "genome", "eval_key", "budget_key"
HOST, PID, REASON, DUPLICATE_OF = "fmnas.host", "fmnas.pid", "fmnas.reason", "fmnas.duplicate_of"
CHECKPOINT = "fmnas.checkpoint"  # artifact path of the saved weights
RUNG = "fmnas.rung"  # multi-fidelity searches: the rung (0 = cheapest budget) an evaluation belongs to
PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"
PAGE = 1000  # search_runs' page limit
EXPERIMENT_KIND = "mlflow.experimentKind"
METRIC_DECIMALS = 6


class StoreError(RuntimeError):
    """The tracking location cannot be used."""


@dataclass(frozen=True)
class StoredEval:
    """A finished evaluation as read back from the store."""

    run_id: str
    genome: str
    eval_key: str
    metrics: dict[str, float]
    parent_run_id: str | None

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


def _retry[T](fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Retry transient SQLite contention ('database is locked', schema races) with backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MlflowException and SQLAlchemy's OperationalError both carry the text
            text = str(e).lower()
            transient = "locked" in text or "duplicate column" in text or "already exists" in text or "busy" in text
            if not transient or i == attempts - 1:
                raise
            log.debug("retrying %s after %s", what, e)
            time.sleep(0.05 * 2**i)
    raise AssertionError("unreachable")


class Store:
    """Results store on one MLflow tracking URI and experiment."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        self.uri = resolve_uri(uri)
        self.experiment_name = experiment
        self._check_writable()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = _retry(self._ensure_experiment, "experiment creation")

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
                self.experiment_name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"}
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
            page = _retry(
                lambda t=token: self.client.search_runs(
                    [self.experiment_id], filter_string, ViewType.ACTIVE_ONLY, PAGE, order_by, page_token=t
                ),
                "search",
            )
            runs += list(page)
            token = page.token
            if not token or (max_results and len(runs) >= max_results):
                return runs[:max_results] if max_results else runs

    @staticmethod
    def _stored(run: Any) -> StoredEval:
        tags = run.data.tags
        return StoredEval(run.info.run_id, tags[GENOME], tags[EVAL_KEY], dict(run.data.metrics), tags.get(PARENT))

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

    def cost_samples(self, host: str, limit: int = 500) -> list[tuple[str, int, float, float]]:
        """(genome, images trained, wall seconds, train seconds) of this host's latest finished evaluations (for the cost model)."""
        f = f"attributes.status = 'FINISHED' AND tags.`{HOST}` = '{host}' AND metrics.wall_seconds > 0"  # evaluations and finals
        runs = self._search(f, ["attributes.start_time DESC"], max_results=limit)
        return [(r.data.tags[GENOME], int(r.data.metrics.get("images_trained", 0)), r.data.metrics["wall_seconds"],
                 r.data.metrics.get("train_seconds", 0.0)) for r in reversed(runs)]  # fmt: skip

    def run_ids(self, role: str, tag: str, value: str) -> set[str]:
        """Ids of runs of one role with tag == value (any status)."""
        return {r.info.run_id for r in self._search(f"tags.`{ROLE}` = '{role}' AND tags.`{tag}` = '{value}'")}

    # -- writing ------------------------------------------------------------------

    def start_run(self, name: str, role: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        """Create a RUNNING run owned by this process; returns its id."""
        all_tags = {RUN_NAME: name, ROLE: role, HOST: socket.gethostname(), PID: str(os.getpid()), **tags}
        if parent_run_id:
            all_tags[PARENT] = parent_run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=name), "create_run")
        return run.info.run_id

    def start_evaluation(
        self,
        genome: str,
        eval_key: str,
        budget_key: str,
        parent_run_id: str | None,
        params: dict[str, Any],
        rung: int | None = None,
        role: str = "evaluation",
    ) -> str:
        """A RUNNING run of `genome` (an evaluation, or a search's retrained winner: role 'final') with its keys,
        params and fidelity rung; returns its id."""
        tags = {GENOME: genome, EVAL_KEY: eval_key, BUDGET_KEY: budget_key} | ({RUNG: str(rung)} if rung is not None else {})
        name = f"final: {genome}" if role == "final" else genome
        run_id = self.start_run(name, role, tags, parent_run_id)
        self.log(run_id, params=params)
        return run_id

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
                _retry(lambda p=part: self.client.log_batch(run_id, **p), "log_batch")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        _retry(lambda: self.client.log_text(run_id, text, artifact_file), "log_text")

    def log_file(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path), "log_artifact")

    def end_run(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        """End a run as FINISHED, FAILED or KILLED; a reason goes into the fmnas.reason tag."""
        if reason:
            _retry(lambda: self.client.set_tag(run_id, REASON, reason[:8000]), "set_tag")
        _retry(lambda: self.client.set_terminated(run_id, status), "set_terminated")

    def download(self, run_id: str, path: str, dst: str) -> str:
        """Download one artifact of a run into `dst`; returns the local path."""
        return _retry(lambda: self.client.download_artifacts(run_id, path, dst), "download")

    def get_run(self, run_id: str) -> RunRecord:
        """The run's record; StoreError if there is no such run."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise StoreError(f"run {run_id!r} not found in {self.uri}: {e.message}") from e
        tags = dict(run.data.tags)
        return RunRecord(run.info.run_id, run.info.run_name, run.info.status, tags.get(ROLE), tags, dict(run.data.params),
                         dict(run.data.metrics), tags.get(PARENT))  # fmt: skip

    # -- recovery -----------------------------------------------------------------

    def reap_orphans(self, alive: Callable[[int], bool] | None = None) -> list[str]:
        """Mark RUNNING runs of dead processes on this host KILLED; returns their ids."""
        alive = alive or _pid_alive
        host, reaped = socket.gethostname(), []
        for run in self._search("attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if tags.get(HOST) != host or not tags.get(PID, "").isdigit() or alive(int(tags[PID])):
                continue
            self.end_run(run.info.run_id, "KILLED", f"process {tags[PID]} on {host} died before finishing this run")
            reaped.append(run.info.run_id)
        return reaped


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
