"""MLflow as the results store: the only package that imports mlflow.

Layout in MLflow: one experiment; a search is a parent run (tag fmnas.role=search); each evaluation is a run
(fmnas.role=evaluation) tagged with its genome, eval_key (genome + everything that changes the result) and
budget_key (eval_key without the genome), nested under the search that trained it. Lookups are tag filters
answered by the tracking store's SQL, never a scan of runs.

`Store` is the facade the rest of the package calls; each concern is a module of its own, after Optuna's
storages: names (tags and limits), records (what lookups return), connection (URIs, fresh SQLite stores,
retries), runs (lookups and writes), liveness (heartbeats, orphans, system metrics), models (checkpoints,
the MLflow Model, the registry).
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars say what runs

from mlflow import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from fmnas_jax.store.connection import _Connection, _schema_lock, _sqlite_path, host_name, resolve_uri, transient_kind
from fmnas_jax.store.liveness import _Liveness
from fmnas_jax.store.models import _Models
from fmnas_jax.store.names import *  # noqa: F403  (the tag names are part of the store's interface)
from fmnas_jax.store.records import ArtifactError, RunRecord, StoredEval, StoreError, as_logged, flatten
from fmnas_jax.store.runs import _Runs

__all__ = ["ArtifactError", "RunRecord", "Store", "StoreError", "StoredEval", "as_logged", "flatten", "host_name", "resolve_uri",
           "transient_kind"]  # fmt: skip


class Store(_Connection, _Runs, _Liveness, _Models):
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
