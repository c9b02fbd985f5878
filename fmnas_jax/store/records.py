"""The typed records the rest of the package sees instead of mlflow objects, and the store's errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fmnas_jax.store.names import CHECKPOINT, METRIC_DECIMALS


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
