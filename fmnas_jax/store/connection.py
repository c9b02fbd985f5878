"""Opening a tracking URI: resolving it, a fresh SQLite store created atomically, bounded retries while the store is
contended or down, the experiment."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fmnas_jax.caches import cache_home, replacing, write_atomically
from fmnas_jax.store.names import EXPERIMENT_KIND, EXPERIMENT_NOTE, NOTE
from fmnas_jax.store.records import StoreError

log = logging.getLogger("fmnas_jax.store")


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


# Two processes inserting one row at once where MLflow looks it up first (a dataset two machines log together, an
# alias two searches set together), in SQLite's and PostgreSQL's words.
DUPLICATE_ROW = ("unique constraint", "duplicate key value")
# Errors that pass: SQLite writers contending, a schema being created by another process, a duplicate row (retried,
# the row is found) ...
_CONTENTION = ("locked", "busy", "duplicate column", "already exists", *DUPLICATE_ROW)


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


@functools.cache
def _schema_head() -> str:
    """The schema revision this MLflow version creates (its alembic migrations' head), found once per MLflow version
    and its set of migrations and kept in schema_cache(): finding it loads every migration script (~1 s of every
    store opened, on a 2-core CPU)."""
    import hashlib

    import mlflow.store

    folder = Path(mlflow.store.__file__).parent / "db_migrations"
    scripts = "\n".join(sorted(p.name for p in (folder / "versions").glob("*.py")))
    kept = schema_cache() / f"mlflow-{mlflow.__version__}-{hashlib.sha256(scripts.encode()).hexdigest()[:12]}.head"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if (head := kept.read_text().strip()) and head.isalnum():
            return head
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(folder)).get_current_head()
    try:
        write_atomically(kept, head.encode())
    except OSError as e:  # no home folder, a read-only cache: found again next time
        log.debug("MLflow's schema head not kept in %s: %s", kept, e)
    return head


def schema_cache() -> Path:
    """Where the empty schema template lives: $XDG_CACHE_HOME/fmnas_jax/mlflow-schema (~/.cache by default)."""
    return cache_home() / "mlflow-schema"


def _schema_version(db: Path) -> str | None:
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError:
        return None
    return rows[0][0] if rows else None


def _schema_template() -> Path | None:
    """An empty SQLite database with this MLflow version's schema and nothing in it (not even an experiment),
    made once per MLflow version by MLflow's own table creation and migrations; None if it cannot be made.

    A fresh store copies it instead of running ~50 migrations (about 3 s of every new store on a 2-core CPU);
    MLflow then opens the copy as a complete database and creates its default experiment in it, as on any store.
    """
    import mlflow

    head = _schema_head()
    try:
        path = schema_cache() / f"mlflow-{mlflow.__version__}-{head}.db"
        if path.exists() and _schema_version(path) == head:
            return path
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables  # what SqlAlchemyStore runs on an empty database

        with replacing(path) as tmp:  # whole or not at all, whoever else makes one at the same time
            engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            if _schema_version(tmp) != head:
                raise ValueError(f"the new template's schema is not MLflow's head {head}")
        return path
    except Exception as e:  # no home folder, a read-only cache, another MLflow layout: the store is created the plain way
        log.debug("no MLflow schema template (%s): a fresh store runs MLflow's migrations", e)
        return None


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


class _Connection:
    """The Store's connection methods (see fmnas_jax.store.Store)."""

    def _create_sqlite_atomically(self) -> None:
        """A new SQLite store is built under a temporary name and linked into place whole.

        MLflow creates its schema with ~50 migrations; two processes doing that on one file at once
        corrupt it for good (leftover _alembic_tmp_* tables). So no process of ours ever migrates a file
        another may be reading: others see either no database or a complete one (and wait, through
        _retry, while one that another tool is still creating reports an out-of-date schema). The
        temporary file starts as a copy of the schema template when there is one (_schema_template).
        """
        db = _sqlite_path(self.uri)
        if db is None:
            return
        if db.exists():
            self._wait_for_schema(db)
            return
        tmp = db.with_name(f".{db.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.creating")
        try:
            if (template := _schema_template()) is not None:
                shutil.copyfile(template, tmp)  # the schema, migrated once per MLflow version (see _schema_template)
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
        return f"{base}/{self.view()}"

    def view(self, run_id: str | None = None, search_filter: str | None = None) -> str:
        """A link relative to the UI's root (for descriptions): the runs table, one run's page, or the runs that
        `search_filter` selects; always in model-training mode (the UI's GenAI mode would otherwise win)."""
        path = f"#/experiments/{self.experiment_id}/runs" + (f"/{run_id}" if run_id else "")
        query = {"searchFilter": search_filter} if search_filter else {}
        return f"{path}?{urlencode(query | {'workflowType': 'machine_learning'}, quote_via=quote)}"
