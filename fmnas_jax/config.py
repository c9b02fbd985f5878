"""Typed, validated settings: frozen dataclasses, and the schemas Hydra composes `conf/` against.

Every section is a frozen dataclass owned by the module that uses it; `AppConfig` gathers them.
`schema()` mirrors each as the mutable dataclass the CLI registers in Hydra's ConfigStore (keys and
types checked while Hydra composes); `realize()` turns the composed config back into the frozen
classes, whose __post_init__ checks the values and the rules between them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fmnas_jax.data import DATA_CONFIGS, TRAIN_IMAGES, DataConfig, FashionMnistData
from fmnas_jax.genome import SearchSpace
from fmnas_jax.recipe import TrainConfig
from fmnas_jax.search import STRATEGY_CONFIGS, FitnessConfig, HillClimbConfig, SearchConfig

MODES = ("search", "train", "predict")
BACKENDS = ("auto", "inprocess", "workers", "devices", "buckets", "ray")


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


def check_bucket_limits(max_models: int, max_waste: float) -> None:
    """ValueError unless a bucket may hold >= 1 genome and spend >= 1x their own compute (bucket_size, bucket_waste)."""
    if max_models < 1 or not max_waste >= 1:
        raise ValueError(f"bucket_size {max_models} must be >= 1 and bucket_waste {max_waste} >= 1")


@dataclass(frozen=True)
class BackendConfig:
    """Where genomes train: `kind` (conf/backend/<kind>.yaml); each kind's own settings are its subclass below."""

    kind: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend {self.kind!r} is not one of {list(BACKENDS)}")
        own = type(self).__dataclass_fields__["kind"].default
        if type(self) is not BackendConfig and self.kind != own:
            raise ValueError(f"backend.kind {self.kind!r} on {type(self).__name__}, the settings of {own!r}: "
                             f"choose the backend with backend={self.kind}")  # fmt: skip


def _check_workers(n: int) -> None:
    if n < 0:
        raise ValueError(f"backend.workers {n} must be >= 0 (0 = one pinned process per CPU core)")


def _check_per_device(n: int) -> None:
    if n < 1:
        raise ValueError(f"backend.per_device {n} must be >= 1")


@dataclass(frozen=True)
class AutoBackend(BackendConfig):
    """backend=auto: the fastest path for the platform (fmnas_jax.backends.choose_backend)."""

    kind: str = "auto"
    workers: int = 0  # CPU worker processes (0 = one per core)
    per_device: int = 4  # evaluations in flight per accelerator

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_workers(self.workers)
        _check_per_device(self.per_device)


@dataclass(frozen=True)
class InProcessBackend(BackendConfig):
    """backend=inprocess: one evaluation at a time in this process."""

    kind: str = "inprocess"


@dataclass(frozen=True)
class WorkersBackend(BackendConfig):
    """backend=workers: single-threaded worker processes, each pinned to one core."""

    kind: str = "workers"
    workers: int = 0  # 0 = one per core

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_workers(self.workers)


@dataclass(frozen=True)
class DevicesBackend(BackendConfig):
    """backend=devices: `per_device` evaluations in flight on each device JAX sees."""

    kind: str = "devices"
    per_device: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_per_device(self.per_device)


@dataclass(frozen=True)
class BucketsBackend(BackendConfig):
    """backend=buckets: the genomes asked for together train in masked, vmapped buckets (fmnas_jax.batched)."""

    kind: str = "buckets"
    bucket_size: int = 16  # most genomes per bucket
    bucket_waste: float = 2.0  # most compute a bucket may spend, relative to its genomes alone

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bucket_limits(self.bucket_size, self.bucket_waste)


@dataclass(frozen=True)
class RayBackend(BackendConfig):
    """backend=ray: evaluations as Ray tasks over a Ray cluster (docs/scaling.md)."""

    kind: str = "ray"
    address: str | None = None  # `auto`, host:port of a running cluster, or null to start one on this machine
    num_cpus: float = 1.0  # CPUs per evaluation
    num_gpus: float = 0.0  # GPUs per evaluation (0.25: four evaluations share a GPU)
    max_in_flight: int = 0  # most evaluations in flight (0 = as many as the cluster's resources hold)
    max_retries: int = 3  # retries of an evaluation whose node or worker died (Ray's own)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus <= 0:
            raise ValueError(
                f"backend.num_cpus {self.num_cpus:g} and backend.num_gpus {self.num_gpus:g} must be >= 0, and not both 0 "
                "(each Ray task needs some resource)"
            )
        if self.max_in_flight < 0 or self.max_retries < 0:
            raise ValueError(f"backend.max_in_flight {self.max_in_flight} and backend.max_retries {self.max_retries} must be >= 0")


BACKEND_CONFIGS: dict[str, type[BackendConfig]] = {
    "auto": AutoBackend,
    "inprocess": InProcessBackend,
    "workers": WorkersBackend,
    "devices": DevicesBackend,
    "buckets": BucketsBackend,
    "ray": RayBackend,
}


def check_model_name(name: str | None, key: str = "registry.model_name") -> None:
    """Raise ValueError unless `name` (the setting `key`) is None or a name MLflow can register.

    Checked before anything trains, not after the search and the retrain: MLflow refuses '/' and ':' only when
    it registers, and names that resolve to another path ('.', '..x'); a single quote would break the store's
    filter string.
    """
    if name is None:
        return
    if not name.strip():
        raise ValueError(f"{key} must be a non-empty name, or null to register nothing")
    if any(c in name for c in "/:'") or name == "." or name.startswith(".."):
        raise ValueError(
            f"{key} {name!r} is not a name MLflow can register: it must not contain '/', ':' or "
            f"a single quote, nor be '.' or start with '..' (e.g. {key}=fmnas-winner)"
        )


@dataclass(frozen=True)
class RegistryConfig:
    """Where retrained winners (and saved train runs) are registered as MLflow Model versions."""

    model_name: str | None = "fmnas-winner"  # null: log the MLflow Model, register nothing

    def __post_init__(self) -> None:
        check_model_name(self.model_name)


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
    data: DataConfig = field(default_factory=FashionMnistData)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=HillClimbConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    backend: BackendConfig = field(default_factory=AutoBackend)
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {list(MODES)}")
        if self.mode == "search":
            self.final.trainer(self.trainer)  # a bad final.* value fails now, named as final.*
            self._check_rungs()

    def _check_rungs(self) -> None:
        """Each rung must train fewer images than the next, up to the search's own budget (trainer.* on data.*)."""
        fid = self.search.fidelity
        if fid.mode == "none" or not self.data.fashion:  # other data's size is known once it is read (the job checks it)
            return
        pool = TRAIN_IMAGES - self.data.val_size  # a rung with train_size null trains on all of them
        cost = [(f"search.fidelity.rungs[{i}]", r.epochs, r.train_size or pool) for i, r in enumerate(fid.rungs)]
        cost.append(("the search's own budget (trainer.epochs on data.train_size)", self.trainer.epochs, self.data.n_train))
        for (a, ea, na), (b, eb, nb) in itertools.pairwise(cost):
            if ea * na >= eb * nb:
                raise ValueError(f"{a} trains {ea} x {na:,} = {ea * na:,} images, not fewer than {b}'s {eb} x {nb:,} = {eb * nb:,}: "
                                 "rungs must grow in cost up to the search's own budget")  # fmt: skip


class ConfigError(ValueError):
    """A config value is out of range, or settings contradict each other."""


# Hydra's ConfigStore holds these schemas (registered by the CLI): OmegaConf makes a frozen dataclass
# read-only, so no config file could be merged into one. Each schema is a mutable mirror of a frozen
# settings class, generated from it (one definition of every setting): the same fields, types and
# defaults, tuples as lists, its base classes' mirrors as bases (so search=<strategy> merges a
# subclass's schema into the `search` node). Hydra checks keys and types against them while it
# composes; `realize` turns the composed objects back into the frozen classes, whose __post_init__
# checks values and cross-field rules.
_REAL: dict[type, type] = {}  # schema -> the frozen class it mirrors
_SCHEMA: dict[type, type] = {}


def schema(cls: type) -> type:
    """The mutable mirror of frozen settings dataclass `cls` (`<Name>Schema`, a module attribute so it pickles)."""
    if cls in _SCHEMA:
        return _SCHEMA[cls]
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(_inner(tp)):  # the declared type's defaults (search: SearchConfig's shared ones)
            default = field(default_factory=schema(_inner(tp)))
        elif isinstance(f.default, tuple):
            default = field(default_factory=lambda d=f.default: list(d))
        elif f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        else:
            default = field()
        specs.append((f.name, _schema_type(tp), default))
    bases = tuple(schema(b) for b in cls.__bases__ if dataclasses.is_dataclass(b))
    name = cls.__name__ + "Schema"
    mirror = dataclasses.make_dataclass(name, specs, bases=bases, module=__name__)
    mirror.__doc__ = f"Hydra's schema of {cls.__module__}.{cls.__name__} (generated from it)."
    globals()[name] = mirror
    _SCHEMA[cls], _REAL[mirror] = mirror, cls
    return mirror


def _inner(tp: Any) -> Any:
    """X for X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _schema_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.Optional[_schema_type(_inner(tp))]  # noqa: UP045 (OmegaConf reads typing.Optional)
    if typing.get_origin(tp) is tuple:
        return list[_schema_type(typing.get_args(tp)[0])]
    if dataclasses.is_dataclass(tp):
        return schema(tp)
    return tp


def realize(obj: Any, name: str = "") -> Any:
    """The frozen settings `obj` (schema instances from OmegaConf.to_object) stands for; lists become tuples,
    non-finite numbers are refused. Each class's __post_init__ runs: ConfigError names the bad setting."""
    if dataclasses.is_dataclass(obj):
        kwargs = {f.name: realize(getattr(obj, f.name), f"{name}.{f.name}" if name else f.name) for f in dataclasses.fields(obj)}
        try:
            return _REAL[type(obj)](**kwargs)
        except ValueError as e:
            raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e
    if isinstance(obj, list | tuple):
        return tuple(realize(v, f"{name}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{name} must be a finite number, got {obj!r}")
    return obj


def backend_schema(kind: str) -> type:
    """The schema of backend `kind`'s settings (backend=<kind> in conf/backend/)."""
    if kind not in BACKEND_CONFIGS:
        raise ConfigError(f"backend {kind!r} is not one of {list(BACKEND_CONFIGS)}")
    return schema(BACKEND_CONFIGS[kind])


def data_schema(source: str) -> type:
    """The schema of data source `source`'s settings (data=<source> in conf/data/)."""
    if source not in DATA_CONFIGS:
        raise ConfigError(f"data.source {source!r} is not one of {list(DATA_CONFIGS)}")
    return schema(DATA_CONFIGS[source])


def search_schema(strategy: str) -> type:
    """The schema of `strategy`'s settings (search=<strategy> in conf/search/)."""
    if strategy not in STRATEGY_CONFIGS:
        raise ConfigError(f"search.strategy {strategy!r} is not one of {list(STRATEGY_CONFIGS)}")
    return schema(STRATEGY_CONFIGS[strategy])


for _cls in (
    AppConfig,
    *STRATEGY_CONFIGS.values(),
    *BACKEND_CONFIGS.values(),
    *DATA_CONFIGS.values(),
):  # every schema exists at import (pickled configs find them)
    schema(_cls)
