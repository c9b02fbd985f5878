"""What the jobs share: opening the store, the result card, the per-class report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fmnas_jax import data as data_mod
from fmnas_jax.config import AppConfig
from fmnas_jax.evaluator import Outcome
from fmnas_jax.inference import TrainedModel, confusion_matrix, load_run, per_class_markdown
from fmnas_jax.report import Card, plot_confusion
from fmnas_jax.store import Store

log = logging.getLogger("fmnas_jax")


def open_store(cfg: AppConfig) -> Store:
    """Check the data first (no run is created for a job that cannot run), then open the store and reap dead runs."""
    data_mod.load_arrays(cfg.data)
    store = Store(cfg.tracking.uri, cfg.tracking.experiment, **cfg.tracking.store_options())
    log.info("results go to MLflow: %s (experiment %r); runs in the UI: %s", store.uri, cfg.tracking.experiment, store.ui_link())
    reaped = store.reap_orphans()
    if reaped:
        log.warning("marked %d run(s) of killed processes as KILLED", len(reaped))
    return store


def card_of(o: Outcome, store: Store, budget: str, data: data_mod.DataConfig) -> Card:
    """The result card of one evaluation."""
    m = o.metric
    return Card(str(o.genome), int(m("param_count")), m("train_accuracy"), m("val_accuracy"), m("test_accuracy"), o.eval_key, o.run_id,
                store.uri, budget, describe_data(data))  # fmt: skip


def describe_data(data: data_mod.DataConfig) -> str:
    """`name: HxWxC, K classes (first names...)` for cards and logs."""
    info = data_mod.data_info(data)
    names = ", ".join(info.class_names[:4]) + (", ..." if len(info.class_names) > 4 else "")
    return f"{info.name}: {info.image}" + ("" if info.name == "fashion_mnist" else f" ({names})")


def print_card(card: Card, out_dir: Path, store: Store | None = None) -> None:
    print("\n" + card.markdown())
    print(f"Files: {out_dir.resolve()}")
    print(f"MLflow: {card.tracking_uri} (run {card.run_id})")
    if store is not None:
        print(f"MLflow UI: {store.ui_link()}  (after: mlflow ui --backend-store-uri {store.uri} --host 127.0.0.1 --port 5000)")


def class_report(o: Outcome, store: Store, cfg: AppConfig, out_dir: Path) -> list[Path]:
    """Per-class test accuracy and a confusion matrix with the data's class names (needs the weights)."""
    arrays = data_mod.load_arrays(cfg.data)
    names = arrays.info.class_names
    if o.variables is not None and o.normalisation is not None:
        model = TrainedModel(o.genome, o.variables, o.normalisation, arrays.info.image, names)
    elif store.get_run(o.run_id).checkpoint:
        model = load_run(o.run_id, store=store)
    else:
        return []
    cm = confusion_matrix(arrays.y_test, model.predict_fn()(arrays.x_test), len(names))
    table = out_dir / "per_class.md"
    table.write_text(f"# Per-class test accuracy ({arrays.info.name})\n\n`{o.genome}`\n\n" + per_class_markdown(cm, names))
    np.savetxt(out_dir / "confusion_matrix.csv", cm, fmt="%d", delimiter=",", header=",".join(names))
    title = f"{o.genome}  test accuracy {100 * np.trace(cm) / cm.sum():.2f}%"
    fig = plot_confusion(cm, names, title, out_dir / "confusion_matrix.png")
    log.info("per-class test accuracy:\n%s", per_class_markdown(cm, names))
    return [table, out_dir / "confusion_matrix.csv", fig]
