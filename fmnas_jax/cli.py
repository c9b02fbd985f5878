"""The command line: the only module that touches Hydra's DictConfig.

python -m fmnas_jax +experiment=hillclimb          # the main job
python -m fmnas_jax +experiment=train genome='NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;'
python -m fmnas_jax --help                         # every config group and option
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from fmnas_jax.config import (
    BACKEND_CONFIGS,
    DATA_CONFIGS,
    AppConfig,
    ConfigError,
    InProcessBackend,
    backend_schema,
    data_schema,
    realize,
    schema,
    search_schema,
)
from fmnas_jax.search import STRATEGY_CONFIGS

log = logging.getLogger("fmnas_jax")


def register_schemas() -> None:
    """Hydra's ConfigStore gets the schemas conf/ is composed against: `schema/app` under config.yaml,
    `schema/search/<strategy>` under each conf/search/<strategy>.yaml, `schema/backend/<kind>` under each
    conf/backend/<kind>.yaml, `schema/data/<source>` under each conf/data/<source>.yaml (a wrong key or type fails
    at composition)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="app", node=schema(AppConfig))
    for name in STRATEGY_CONFIGS:
        store.store(group="schema/search", name=name, node=search_schema(name))
    for kind in BACKEND_CONFIGS:
        store.store(group="schema/backend", name=kind, node=backend_schema(kind))
    for source in DATA_CONFIGS:
        store.store(group="schema/data", name=source, node=data_schema(source))


register_schemas()


def to_app_config(cfg: DictConfig) -> AppConfig:
    """The frozen settings of a composed config (or of a plain one, checked against the same schemas);
    ConfigError names the bad key and value."""
    ours = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's own node may not resolve here
    strategy = OmegaConf.select(ours, "search.strategy", default="hillclimb")
    kind = OmegaConf.select(ours, "backend.kind", default="auto")
    source = OmegaConf.select(ours, "data.source", default="fashion_mnist")
    for group, key, name, what, schemas in (
        ("search", "strategy", strategy, "strategy", {s: search_schema(s) for s in STRATEGY_CONFIGS}),
        ("backend", "kind", kind, "backend", {k: backend_schema(k) for k in BACKEND_CONFIGS}),
        ("data", "source", source, "data source", {s: data_schema(s) for s in DATA_CONFIGS}),
    ):
        composed_as = OmegaConf.get_type(ours, group) if group in ours else None
        if composed_as in schemas.values() and composed_as is not schemas.get(name):
            raise ConfigError(f"{group}.{key}={name} was set on the settings of another {what} "
                              f"({composed_as.__name__}): choose the {what} with {group}={name}")  # fmt: skip
    try:
        parts = {"search": search_schema(strategy), "backend": backend_schema(kind), "data": data_schema(source)}
        typed = OmegaConf.merge(schema(AppConfig), parts, ours)
        app = realize(OmegaConf.to_object(typed))
    except OmegaConfBaseException as e:
        lines = [ln.strip() for ln in str(e).splitlines() if not ln.strip().startswith(("reference_type", "object_type"))]
        raise ConfigError("; ".join(lines)) from None  # OmegaConf's message and the full key
    if app.mode == "train":
        from fmnas_jax.genome import PAPER_GENOME, Genome

        if not app.genome:
            raise ConfigError(f"mode=train needs genome='{PAPER_GENOME}' (or another)")
        Genome.parse(app.genome, app.search_space)
    if app.mode == "predict" and not (app.run_id or app.checkpoint):
        raise ConfigError("mode=predict needs run_id=<MLflow run id> or checkpoint=<path to checkpoint.msgpack>")
    return app


class EnsureStore(Callback):
    """Before multirun jobs start: create the MLflow database and experiment once (avoids schema races)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fmnas_jax.store import Store

        try:
            app = to_app_config(config)
        except Exception as e:  # each job reports a bad value itself
            log.warning("could not prepare the MLflow store before the sweep: %s", e)
            return
        store = Store(app.tracking.uri, app.tracking.experiment, **app.tracking.store_options())
        log.info("MLflow store ready for the sweep: %s (experiment %r)", store.uri, app.tracking.experiment)


def _quiet_libraries() -> None:
    for name in ("alembic", "mlflow", "absl", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each HTTP retry; the store logs the outage once


@hydra.main(version_base="1.3", config_path="pkg://fmnas_jax.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the job the config describes; returns the winner's validation accuracy (for sweepers)."""
    _quiet_libraries()
    try:
        app = to_app_config(cfg)
    except ValueError as e:
        print(f"fmnas_jax: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)

    from fmnas_jax import jobs
    from fmnas_jax.backends import BackendError
    from fmnas_jax.caches import cache_home
    from fmnas_jax.checkpoint import CheckpointError
    from fmnas_jax.data import DataError
    from fmnas_jax.runtime import enable_compilation_cache, malloc_summary, platform_summary
    from fmnas_jax.store import StoreError, resolve_uri

    app = replace(app, cache_dir=app.cache_dir or str(cache_home() / "jax"))  # workers share it
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if app.backend.kind == "auto" and "BasicLauncher" not in launcher:
        # A parallel launcher (joblib, submitit) already runs jobs side by side; no pools inside its workers.
        log.info("backend=auto under %s: evaluating in-process", launcher.rsplit(".", 1)[-1])
        app = replace(app, backend=InProcessBackend())
    enable_compilation_cache(app.cache_dir)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("platform: %s; malloc: %s; run directory: %s", platform_summary(), malloc_summary(), out_dir)
    try:
        with logging_redirect_tqdm(), _terminate_as_interrupt():  # log lines print above the progress bars, not through them
            card = jobs.run(app, OmegaConf.to_yaml(cfg, resolve=True), out_dir)
    except (DataError, StoreError, FileNotFoundError, CheckpointError, BackendError) as e:
        print(f"fmnas_jax: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        log.warning(
            "%s: runs in flight are marked KILLED in %s; run the same command again to resume (finished evaluations are reused)",
            "stopped (SIGTERM)" if isinstance(e, Terminated) else "interrupted",
            resolve_uri(app.tracking.uri),
        )
        sys.exit(128 + signal.SIGTERM if isinstance(e, Terminated) else 130)
    return card.val_accuracy


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the job stops as Ctrl-C stops it."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (how SLURM, Kubernetes, systemd and `kill` stop a job) ends the job as Ctrl-C does: runs in flight
    KILLED, worker processes stopped, exit status 143."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quote_values(argv: list[str]) -> list[str]:
    """Quote genome strings for Hydra's override grammar, which rejects a bare ';'.

    The shell turns genome='NC 4 5 sigmoid;...;' into genome=NC 4 5 sigmoid;...; which Hydra
    cannot parse; re-quoting lets the README's commands work exactly as written. A comma
    separates genomes of a sweep (-m genome='A;...;','B;...;' arrives as genome=A;...;,B;...;).
    """
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "genome" and value and value[0] not in "'\"":
            quoted = ("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in value.split(","))
            out.append(key + "=" + ",".join(quoted))
        else:
            out.append(arg)
    return out
