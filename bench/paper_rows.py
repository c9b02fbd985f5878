"""bench/results/paper/rows.csv from the paper experiment's store: one row per finished evaluation, in the order they
ended, the paper's columns first (genome, params, train and test accuracy), then validation accuracy, training FLOPs
per image, wall seconds, the seed and the MLflow run id.

    .venv/bin/python bench/paper_rows.py            # reads bench/results/paper/mlflow.db
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from mlflow import MlflowClient

from fmnas_jax.genome import Genome, train_flops_per_image

HERE = Path(__file__).parent / "results" / "paper"
COLUMNS = ["genome", "params", "train_accuracy", "test_accuracy", "val_accuracy", "train_flops_per_image", "wall_seconds", "seed",
           "run_id"]  # fmt: skip


def main(folder: Path = HERE) -> int:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fmnas_jax")
    found = client.search_runs([experiment.experiment_id], "tags.`fmnas.role` = 'evaluation' and attributes.status = 'FINISHED'",
                               max_results=5000)  # fmt: skip
    with (folder / "rows.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for run in sorted(found, key=lambda r: r.info.end_time):
            m, genome = run.data.metrics, run.data.tags["genome"]
            out.writerow([genome, int(m["param_count"]), m.get("train_accuracy"), m.get("test_accuracy"), m.get("val_accuracy"),
                          train_flops_per_image(Genome.parse(genome)), round(m["perf/wall_seconds"], 1), run.data.params.get("seed"),
                          run.info.run_id])  # fmt: skip
    print(f"{len(found)} rows -> {folder / 'rows.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
