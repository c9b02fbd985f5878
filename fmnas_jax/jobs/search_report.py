"""The search job's report: the results CSV, the figures, the climb's path, the result card, and the search run's
description with links to its filtered views in the MLflow UI."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from fmnas_jax.backends import EvalSpec
from fmnas_jax.config import AppConfig
from fmnas_jax.data import data_info
from fmnas_jax.evaluator import Outcome, describe_budget
from fmnas_jax.jobs.common import card_of, class_report, print_card
from fmnas_jax.objective import SearchObjective
from fmnas_jax.report import Card, Row, plot_curves, plot_search, write_card, write_csv
from fmnas_jax.search.base import ClimbResult
from fmnas_jax.store import Store

log = logging.getLogger("fmnas_jax")


def _row(o: Outcome, fitness: float, rung: int | None) -> Row:
    m = o.metric
    return Row(str(o.genome), int(m("param_count")), m("train_accuracy"), m("val_accuracy"), m("test_accuracy"), fitness, o.eval_key,
               o.run_id, "reused" if o.reused else "trained", rung)  # fmt: skip


def log_counts(stage: str, rungs: list[SearchObjective]) -> None:
    parts = ["rung {}: {trained} trained, {reused} reused, {failed} failed".format(i, **r.evaluator.counts()) for i, r in enumerate(rungs)]
    log.info("%s; %s", stage, "; ".join(parts) if len(rungs) > 1 else parts[0].split(": ", 1)[1])


def _views(store: Store, parent: str, n_rungs: int) -> str:
    """Links to the filtered runs tables this search's description talks about (no id to copy by hand)."""
    mine = f"tags.mlflow.parentRunId = '{parent}'"
    views = [("every evaluation of this search", f"{mine} AND tags.`fmnas.role` = 'evaluation'")]
    if n_rungs > 1:
        views += [
            (f"rung {r}" + (" (the top rung)" if r == n_rungs - 1 else ""), f"{mine} AND tags.`fmnas.rung` = '{r}'") for r in range(n_rungs)
        ]
    views.append(("the winner's final run", f"{mine} AND tags.`fmnas.role` = 'final'"))
    items = "\n".join(f"- [{what}]({store.view(search_filter=f)})" for what, f in views)
    return f"Views (Chart view on any of them: `param_count` against `val_accuracy`):\n{items}\n\nProgress: this run's `best_fitness`, " \
           "`best_val_accuracy` (top rung) and `evaluations_r<rung>` metrics, against Step (evaluations counted) or Time."  # fmt: skip


def report(
    cfg: AppConfig,
    store: Store,
    parent: str,
    rungs: list[SearchObjective],
    result: ClimbResult,
    final: Outcome,
    final_spec: EvalSpec,
    out_dir: Path,
) -> Card:
    rows = [_row(o, rung.fitness_of(o), r if len(rungs) > 1 else None) for r, rung in enumerate(rungs) for o in rung.outcomes.values()
            if o.status == "FINISHED"]  # fmt: skip
    files = [write_csv(rows, out_dir / "results.csv")]
    shown = [row for row in rows if row.rung in (None, len(rungs) - 1)]
    title = f"{cfg.search.strategy} search, seed {cfg.search.seed}: {len(shown)} evaluations ({describe_budget(cfg.trainer, cfg.data)})"
    if len(rungs) > 1:
        title += f"; {len(rows) - len(shown)} more screened on cheaper rungs (shown by validation accuracy)"
    final_point = (int(final.metric("param_count")), final.metric("test_accuracy"))
    moved = [str(s.genome) for s in result.path if s.move != "best"]  # a "best" step is the winner chosen, not a move
    fashion = data_info(cfg.data).name == "fashion_mnist"
    files.append(plot_search(rows, moved, str(final.genome), out_dir / "params_vs_accuracy.png", title, final_point, paper=fashion))
    path = [asdict(s) | {"genome": str(s.genome)} for s in result.path]
    (out_dir / "climb_path.json").write_text(json.dumps(path, indent=1, default=float) + "\n")
    files.append(out_dir / "climb_path.json")
    if final.history:
        files.append(plot_curves(final.history, str(final.genome), out_dir / "winner_curves.png"))
    card = card_of(final, store, describe_budget(final_spec.trainer, final_spec.data), final_spec.data)
    files += write_card(card, out_dir)
    per_class = class_report(final, store, cfg, out_dir)
    if not final.reused:  # the winner's own run gets its per-class report too
        for f in per_class:
            store.log_file(final.run_id, f, "report")
    files += per_class
    for f in files:
        store.log_file(parent, f, "report")
    store.log(
        parent,
        metrics={"winner_params": card.params, "winner_val_accuracy": card.val_accuracy, "winner_test_accuracy": card.test_accuracy},
        tags={"winner": card.genome, "winner_run_id": card.run_id},
    )
    link = store.view(card.run_id)
    retrained = describe_budget(final_spec.trainer, final_spec.data)
    store.describe(parent, f"A {cfg.search.strategy} search, seed {cfg.search.seed}.\n\nWinner: [`{card.genome}`]({link}), "
                           f"retrained: {retrained}.\n\n{_views(store, parent, len(rungs))}\n\n{card.markdown()}")  # fmt: skip
    print_card(card, out_dir, store)
    return card
