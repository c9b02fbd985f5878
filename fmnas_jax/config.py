"""Typed, validated settings built from plain dicts (the CLI turns Hydra's DictConfig into one).

Every section is a frozen dataclass owned by the module that uses it; `AppConfig` gathers
them. `build()` rejects unknown keys and wrong types with the key's full dotted name.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fmnas_jax.batched import check_bucket_limits
from fmnas_jax.data import TRAIN_IMAGES, DataConfig
from fmnas_jax.genome import SearchSpace
from fmnas_jax.search.base import HillClimbConfig, SearchConfig
from fmnas_jax.search.fitness import FitnessConfig
from fmnas_jax.train import TrainConfig

MODES = ("search", "train", "predict")
BACKENDS = ("auto", "inprocess", "workers", "devices", "buckets")
MOVED = {  # top-level keys that moved into the backend group, and what replaces each
    "workers": "backend=inprocess (was workers=1) or backend=workers backend.workers=N",
    "batching": "backend=buckets (was batching=buckets)",
    "bucket_size": "backend=buckets backend.bucket_size=N",
    "bucket_waste": "backend=buckets backend.bucket_waste=X",
}


@dataclass(frozen=True)
class TrackingConfig:
    """Where results go: an MLflow tracking URI (null = sqlite mlflow.db in the launch dir)."""

    uri: str | None = None
    experiment: str = "fmnas_jax"
    retry_seconds: float = 300.0  # how long a job waits for an unreachable store (server or database down) before it gives up
    heartbeat_seconds: float = 30.0  # how often a job refreshes the fmnas.heartbeat tag of its RUNNING runs
    heartbeat_timeout: float = 600.0  # RUNNING runs whose heartbeat is older are marked KILLED by the next job to open the store
    system_metrics_seconds: float = 10.0  # MLflow system metrics (CPU, memory, disk, network, GPU) on each search's run; 0 = off

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError("tracking.experiment must be a non-empty name")
        for name in ("retry_seconds", "heartbeat_seconds", "heartbeat_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"tracking.{name}={value!r}: must be a positive number of seconds")
        sm = self.system_metrics_seconds
        if not isinstance(sm, (int, float)) or isinstance(sm, bool) or not (sm == 0 or sm >= 1):
            raise ValueError(f"tracking.system_metrics_seconds={sm!r}: must be 0 (off) or at least 1 second")
        if self.heartbeat_timeout <= 2 * self.heartbeat_seconds:
            raise ValueError(
                f"tracking.heartbeat_timeout={self.heartbeat_timeout:g} must exceed twice "
                f"tracking.heartbeat_seconds={self.heartbeat_seconds:g} (live runs would be reaped)"
            )

    def store_options(self) -> dict[str, float]:
        """The keyword arguments of store.Store beyond uri and experiment."""
        names = ("retry_seconds", "heartbeat_seconds", "heartbeat_timeout", "system_metrics_seconds")
        return {n: float(getattr(self, n)) for n in names}


@dataclass(frozen=True)
class FinalConfig:
    """Budget and recipe for retraining the winner. Null epochs, learning rate and recipe fields fall back
    to trainer.*; train_size null means every training image (data.val_size is kept)."""

    epochs: int | None = None
    train_size: int | None = None
    learning_rate: float | None = None
    label_smoothing: float | None = None
    augment_crop: int | None = None
    augment_flip: bool | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"final.epochs {self.epochs} must be >= 1")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"final.learning_rate {self.learning_rate} must be a positive finite number")

    def trainer(self, base: TrainConfig) -> TrainConfig:
        """The winner's trainer: `base` with this section's non-null settings, weights kept."""
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "train_size"}
        try:
            return dataclasses.replace(base, **overrides, save=True)
        except ValueError as e:
            raise ValueError(str(e).replace("trainer.", "final.")) from None

    def data(self, base: DataConfig) -> DataConfig:
        """The winner's data: every training image unless final.train_size says otherwise."""
        return dataclasses.replace(base, train_size=self.train_size)


@dataclass(frozen=True)
class BackendConfig:
    """Where genomes train (conf/backend/*.yaml); each kind reads its own settings."""

    kind: str = "auto"  # auto | inprocess | workers | devices | buckets
    workers: int = 0  # auto, workers: CPU worker processes (0 = one per core)
    per_device: int = 4  # auto (accelerators), devices: evaluations in flight per device
    bucket_size: int = 16  # buckets: most genomes per bucket
    bucket_waste: float = 2.0  # buckets: most compute a bucket may spend, relative to its genomes alone

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend {self.kind!r} is not one of {list(BACKENDS)}")
        if self.workers < 0:
            raise ValueError(f"backend.workers {self.workers} must be >= 0 (0 = one pinned process per CPU core)")
        if self.per_device < 1:
            raise ValueError(f"backend.per_device {self.per_device} must be >= 1")
        if self.kind == "buckets":
            check_bucket_limits(self.bucket_size, self.bucket_waste)


@dataclass(frozen=True)
class RegistryConfig:
    """Where retrained winners (and saved train runs) are registered as MLflow Model versions."""

    model_name: str | None = "fmnas-winner"  # null: log the MLflow Model, register nothing

    def __post_init__(self) -> None:
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("registry.model_name must be a non-empty name, or null to register nothing")


@dataclass(frozen=True)
class AppConfig:
    """The whole job, as the CLI resolved it."""

    mode: str = "search"
    seed: int = 0
    genome: str | None = None
    run_id: str | None = None
    checkpoint: str | None = None
    images: str | None = None
    search_space: SearchSpace = field(default_factory=SearchSpace)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=HillClimbConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    workers: int | None = None  # moved to backend (refused when set)
    batching: str | None = None
    bucket_size: int | None = None
    bucket_waste: float | None = None
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {list(MODES)}")
        moved = [f"{k}={getattr(self, k)}: use {v}" for k, v in MOVED.items() if getattr(self, k) is not None]
        if moved:
            raise ValueError("settings moved into the backend group (conf/backend/): " + "; ".join(moved))
        if self.mode == "search":
            self.final.trainer(self.trainer)  # a bad final.* value fails now, named as final.*
            self._check_rungs()

    def _check_rungs(self) -> None:
        """Each rung must train fewer images than the next, up to the search's own budget (trainer.* on data.*)."""
        fid = self.search.fidelity
        if fid.mode == "none":
            return
        pool = TRAIN_IMAGES - self.data.val_size  # a rung with train_size null trains on all of them
        cost = [(f"search.fidelity.rungs[{i}]", r.epochs, r.train_size or pool) for i, r in enumerate(fid.rungs)]
        cost.append(("the search's own budget (trainer.epochs on data.train_size)", self.trainer.epochs, self.data.n_train))
        for (a, ea, na), (b, eb, nb) in itertools.pairwise(cost):
            if ea * na >= eb * nb:
                raise ValueError(f"{a} trains {ea} x {na:,} = {ea * na:,} images, not fewer than {b}'s {eb} x {nb:,} = {eb * nb:,}: "
                                 "rungs must grow in cost up to the search's own budget")  # fmt: skip


class ConfigError(ValueError):
    """A config value has the wrong type or an unknown key."""


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        if hasattr(tp, "variant_for"):  # a section whose settings depend on one of its values (search.strategy)
            try:
                tp = tp.variant_for(value, name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return build(tp, value, name)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. search.time_budget=600 (a duration that may also be '10m')
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def build[T](cls: type[T], values: dict, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from `values`, checking keys and types; errors name the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = prefix or "the config"
        if "strategy" in fields and "strategy" in values:
            where += f" (search={values['strategy']} has no such setting)"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def app_config(values: dict) -> AppConfig:
    """AppConfig from a plain (resolved) dict; the `hydra` node, if present, is ignored."""
    return build(AppConfig, {k: v for k, v in values.items() if k != "hydra"})
