"""Which RUNNING runs are alive: heartbeats of this process's runs, runs other processes train, reaping orphans, system metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from fmnas_jax.store.connection import _first_line, host_name
from fmnas_jax.store.names import BUDGET_KEY, EVAL_KEY, HEARTBEAT, HOST, PID, ROLE, SYSTEM_METRICS_STOP_SECONDS

log = logging.getLogger("fmnas_jax.store")


def _heartbeat(run: Any) -> float:
    """When the run's owner last showed it was alive (unix seconds): its heartbeat tag, else its start."""
    beat = run.data.tags.get(HEARTBEAT, "")
    return float(beat) if beat.isdigit() else run.info.start_time / 1000


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


class _Liveness:
    """The Store's liveness methods (see fmnas_jax.store.Store)."""

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
