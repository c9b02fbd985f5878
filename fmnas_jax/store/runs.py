"""Run records and lookups: finding finished evaluations by key, creating runs, logging to them, ending them."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from fmnas_jax.store.connection import _first_line, host_name
from fmnas_jax.store.names import (
    BUDGET_KEY,
    DUPLICATE_OF,
    EVAL_KEY,
    GENOME,
    HEARTBEAT,
    HOST,
    NOTE,
    PAGE,
    PARENT,
    PID,
    REASON,
    REQUEST,
    ROLE,
    RUN_NAME,
    RUNG,
    logged_name,
    read_metrics,
)
from fmnas_jax.store.records import ArtifactError, RunRecord, StoredEval, StoreError, as_logged

log = logging.getLogger("fmnas_jax.store")


class _Runs:
    """The Store's runs methods (see fmnas_jax.store.Store)."""

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
        metrics = read_metrics(run.data.metrics)
        return StoredEval(run.info.run_id, tags[GENOME], tags[EVAL_KEY], metrics, tags.get(PARENT), run.info.end_time or 0)

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

    def cost_samples(self, host: str, data: str | None = None, limit: int = 500) -> list[tuple[str, int, float, float]]:
        """(genome, images trained, wall seconds, train seconds) of this host's latest finished evaluations on one dataset
        (for the cost model): `data` is the digest other data's runs log as `data.data`; None: Fashion-MNIST's runs."""
        wall = logged_name("wall_seconds")  # runs logged before the perf/ prefix give no samples: the model starts afresh
        f = f"attributes.status = 'FINISHED' AND tags.`{HOST}` = '{host}' AND metrics.`{wall}` > 0"  # evaluations and finals
        runs = self._search(f, ["attributes.start_time DESC"], max_results=limit)
        rows = [(r.data.tags[GENOME], read_metrics(r.data.metrics)) for r in reversed(runs) if r.data.params.get("data.data") == data]
        return [(g, int(m.get("images_trained", 0)), m["wall_seconds"], m.get("train_seconds", 0.0)) for g, m in rows]

    def run_ids(self, role: str, tag: str, value: str) -> set[str]:
        """Ids of runs of one role with tag == value (any status)."""
        return {r.info.run_id for r in self._search(f"tags.`{ROLE}` = '{role}' AND tags.`{tag}` = '{value}'")}

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
        params, fidelity rung, a markdown description and the data
        splits it uses (`data.SplitRecord`s); returns its id."""
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

    def log(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
        history: Sequence[dict[str, float]] = (),
    ) -> None:
        """Log finite metrics (at `step`), per-epoch rows (`history`, at steps 1, 2, ...), params (None ones left out)
        and tags, together in as few log_batch calls as MLflow's limits allow: one, for a whole evaluation's curves and
        results (a tracking server answers one request, a SQLite store commits once)."""
        now = int(time.time() * 1000)
        rows = [(step, metrics or {}), *enumerate(history, start=1)]
        ms = [Metric(logged_name(k), as_logged(v), now, at) for at, row in rows for k, v in row.items()
              if v is not None and math.isfinite(float(v))]  # fmt: skip
        ps = [Param(k, str(v)) for k, v in (params or {}).items() if v is not None]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        while ms or ps or ts:  # log_batch takes at most 100 params, 100 tags and 1,000 items in all
            part_ps, part_ts = ps[:100], ts[:100]
            ps, ts = ps[100:], ts[100:]
            room = 1000 - len(part_ps) - len(part_ts)
            part_ms, ms = ms[:room], ms[room:]
            self._retry(lambda m=part_ms, p=part_ps, t=part_ts: self.client.log_batch(run_id, metrics=m, params=p, tags=t),
                        "logging to a run")  # fmt: skip

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
                         read_metrics(run.data.metrics), tags.get(PARENT), run.info.start_time or 0)  # fmt: skip
