"""Jobs the CLI runs: train one genome, search, or predict with saved weights (one module each)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fmnas_jax.config import AppConfig
from fmnas_jax.report import Card


def run(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Run the job `cfg.mode` names; `config_yaml` (the composed config) is logged once, on the job's own run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode != "predict":
        cfg = on_data(cfg)
    if cfg.mode == "search":
        from fmnas_jax.jobs.search import run_search

        return run_search(cfg, config_yaml, out_dir)
    if cfg.mode == "predict":
        from fmnas_jax.jobs.predict import run_predict

        return run_predict(cfg, out_dir)
    from fmnas_jax.jobs.train import run_train

    return run_train(cfg, config_yaml, out_dir)


def on_data(cfg: AppConfig) -> AppConfig:
    """`cfg` with its search space over the configured data's image shape and classes (read and checked now, before
    any run is created); DataError when the data is unusable or the space's layout does not fit its images."""
    from fmnas_jax.data import DataError, data_info, load_arrays
    from fmnas_jax.genome import FASHION_MNIST

    info = data_info(cfg.data)
    if cfg.backend.kind == "buckets" and info.image != FASHION_MNIST:
        raise DataError(f"backend=buckets trains {FASHION_MNIST} data only; data {info.name} is {info.image}: use backend=auto")
    if cfg.mode == "search":  # every rung's and the retrain's split must fit the data too
        for r in cfg.search.fidelity.rungs if cfg.search.fidelity.mode != "none" else ():
            load_arrays(replace(cfg.data, train_size=r.train_size))
        load_arrays(cfg.final.data(cfg.data))
    try:
        return replace(cfg, search_space=cfg.search_space.for_image(info.image))
    except ValueError as e:
        raise DataError(f"{e} (data {info.name}: {info.image})") from e
