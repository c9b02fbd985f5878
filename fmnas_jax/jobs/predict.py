"""The predict job: load saved weights, re-measure test accuracy, classify images."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np

from fmnas_jax import data as data_mod
from fmnas_jax.checkpoint import CheckpointError
from fmnas_jax.config import AppConfig
from fmnas_jax.evaluator import describe_budget
from fmnas_jax.genome import Genome, count_params
from fmnas_jax.inference import load_checkpoint, load_run, read_images
from fmnas_jax.jobs.common import describe_data
from fmnas_jax.report import Card
from fmnas_jax.store import Store, as_logged
from fmnas_jax.train import compiled_eval, evaluate_split, to_device


def run_predict(cfg: AppConfig, out_dir: Path) -> Card:
    """Load saved weights, re-measure test accuracy with the evaluation program, classify `images` (writes no run)."""
    data_cfg, seed, logged, store = cfg.data, cfg.seed, math.nan, None
    if cfg.run_id:
        store = Store(cfg.tracking.uri, cfg.tracking.experiment, **cfg.tracking.store_options())
        run = store.get_run(cfg.run_id)
        model = load_run(cfg.run_id, store=store)
        # Evaluate on exactly the split the run was trained with.
        data_cfg = replace(
            cfg.data, val_size=run.int_param("data.val_size", cfg.data.val_size), train_size=run.int_param("data.train_size")
        )
        seed, logged = run.int_param("seed", cfg.seed), run.metric("test_accuracy")
    else:
        model = load_checkpoint(cfg.checkpoint or "")
    if cfg.genome and Genome.parse(cfg.genome, cfg.search_space) != model.genome:
        raise CheckpointError(f"genome {cfg.genome!r} does not match the checkpoint's {model.genome}")
    dd = to_device(data_mod.load(data_cfg, seed), cfg.trainer.eval_batch_size)
    variables = jax.device_put(model.variables)
    _, test_acc = evaluate_split(compiled_eval(model.genome, dd), variables, dd, dd.test_range)
    same = f"logged: {logged:.4f}" if math.isfinite(logged) else "no logged value"
    same = "matches the logged value" if as_logged(test_acc) == logged else same
    if dd.image != model.image:
        raise CheckpointError(
            f"the model was trained on {model.image} data, data={data_cfg.source} gives {dd.image}: pass the run's data settings"
        )
    print(f"\n{model.genome}: {count_params(model.genome, model.image):,} params, test accuracy {100 * test_acc:.2f}% ({same})")
    if cfg.images:
        _classify(model, cfg.images, out_dir)
    uri = store.uri if store else str(cfg.checkpoint)
    return Card(str(model.genome), count_params(model.genome, model.image), math.nan, math.nan, test_acc, "", cfg.run_id or "", uri,
                describe_budget(cfg.trainer, data_cfg), describe_data(data_cfg))  # fmt: skip


def _classify(model, images_path: str, out_dir: Path) -> None:
    pred, names = model.predict_fn()(read_images(images_path, model.image)), model.class_names
    with (out_dir / "predictions.csv").open("w") as f:
        f.write("index,class_id,class_name\n")
        f.writelines(f"{i},{c},{names[c]}\n" for i, c in enumerate(pred))
    for i, c in enumerate(pred[:20]):
        print(f"  image {i}: {names[c]}")
    counts = ", ".join(f"{names[c]} {n}" for c, n in enumerate(np.bincount(pred, minlength=len(names))) if n)
    print(f"{len(pred)} images classified ({counts}); all predictions: {(out_dir / 'predictions.csv').resolve()}")
