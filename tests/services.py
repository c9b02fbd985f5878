"""Real services for the team-setup tests: an `mlflow server` and a PostgreSQL cluster on loopback.

Each can be stopped and started again on the same port (the fault tests restart them mid-search).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN = (
    next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
    if Path("/usr/lib/postgresql").exists()
    else None
)
HAVE_POSTGRES = PG_BIN is not None and shutil.which("runuser") is not None


# A tracking server only: MLflow 3's server also starts job-runner processes (GenAI features) unless told not to; each
# imports MLflow again (several CPU-seconds a server start) and none of them serves tracking.
TRACKING_ONLY = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, every: float = 0.25) -> None:
    """Poll `check()` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own backend store and artifact folder."""

    def __init__(self, backend_uri: str, artifacts: Path, log_path: Path, workers: int = 1) -> None:
        self.backend_uri, self.artifacts, self.log_path, self.workers = backend_uri, artifacts, log_path, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=TRACKING_ONLY,
        )  # fmt: skip
        try:
            wait_until(self.healthy, timeout, f"mlflow server on {self.url}", every=0.5)
        except AssertionError:
            raise AssertionError("mlflow server did not come up:\n" + self.log_path.read_text()[-3000:]) from None

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and all its worker processes (its process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root; run its tools as the 'postgres' user when we are root."""
    if os.geteuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--", *cmd)
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a database 'mlflow'."""

    def __init__(self) -> None:
        # pytest's tmp_path is private to root; PostgreSQL runs as 'postgres' and needs its own folder.
        self.root = Path(tempfile.mkdtemp(prefix="fmnas-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.data.mkdir(), self.sock.mkdir()
        if os.geteuid() == 0:
            for p in (self.root, self.data, self.sock):
                shutil.chown(p, "postgres")
        self.port = free_port()
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1"
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "start")

    def create_db(self) -> None:
        _as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def stop(self) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
