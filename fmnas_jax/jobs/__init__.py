"""Jobs the CLI runs: train one genome, search, or predict with saved weights (one module each)."""

from __future__ import annotations

from pathlib import Path

from fmnas_jax.config import AppConfig
from fmnas_jax.report import Card


def run(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Run the job `cfg.mode` names; `config_yaml` (the composed config) is logged once, on the job's own run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "search":
        from fmnas_jax.jobs.search import run_search

        return run_search(cfg, config_yaml, out_dir)
    if cfg.mode == "predict":
        from fmnas_jax.jobs.predict import run_predict

        return run_predict(cfg, out_dir)
    from fmnas_jax.jobs.train import run_train

    return run_train(cfg, config_yaml, out_dir)
