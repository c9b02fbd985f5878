"""The train job: train and evaluate one genome (the paper's step VII) and print its result card."""

from __future__ import annotations

import logging
from pathlib import Path

from fmnas_jax.backends import EvalSpec, InProcess
from fmnas_jax.config import AppConfig
from fmnas_jax.evaluator import Evaluator, describe_budget
from fmnas_jax.genome import Genome
from fmnas_jax.jobs.common import card_of, class_report, open_store, print_card
from fmnas_jax.progress import EpochBar
from fmnas_jax.report import Card, plot_curves, write_card

log = logging.getLogger("fmnas_jax")


def run_train(cfg: AppConfig, config_yaml: str, out_dir: Path) -> Card:
    """Train `cfg.genome` with cfg.trainer on cfg.data (or reuse the stored run of the same budget)."""
    genome = Genome.parse(cfg.genome or "", cfg.search_space)
    store = open_store(cfg)
    spec = EvalSpec(cfg.trainer, cfg.data, cfg.seed, keep_variables=cfg.trainer.save)
    with EpochBar(cfg.trainer.epochs, cfg.progress) as bar:
        outcome = Evaluator(store, spec, InProcess(fused=True), on_epoch=bar.update, register_as=cfg.registry.model_name).evaluate(genome)
    if outcome.reused:
        log.info("reused stored run %s (same genome and budget); nothing trained", outcome.run_id)
    else:
        store.log_text(outcome.run_id, config_yaml, "config.yaml")
    if outcome.status != "FINISHED":
        raise RuntimeError(f"evaluation of {genome} failed: see MLflow run {outcome.run_id}")
    card = card_of(outcome, store, describe_budget(cfg.trainer, cfg.data), cfg.data)
    files = write_card(card, out_dir)
    if outcome.history:
        files.append(plot_curves(outcome.history, str(genome), out_dir / "curves.png"))
    files += class_report(outcome, store, cfg, out_dir)
    if not outcome.reused:
        for f in files:
            store.log_file(outcome.run_id, f, "report")
    print_card(card, out_dir, store)
    return card
