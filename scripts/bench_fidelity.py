"""How well the main job's rungs rank genomes: each rung's validation accuracy against a long retrain's test accuracy.

    .venv/bin/python scripts/bench_fidelity.py                      # 30 genomes, the main job's rungs, 30-epoch retrains
    .venv/bin/python scripts/bench_fidelity.py --genomes 12 --retrain-epochs 10 --noise-genomes 4   # a quick look
    .venv/bin/python scripts/bench_fidelity.py --report             # the table from docs/bench_fidelity.csv only

Genomes are drawn uniformly from the main job's space (`+experiment=hillclimb`: at most 16,598 parameters),
so good and bad ones both appear. Each is evaluated at every rung of the main job (1 epoch on 4,000
images, 2 on 10,000, 3 on 20,000) on the worker pool, and retrained with the main job's final recipe
(`--retrain-epochs` on all 55,000, label smoothing 0.1) in-process; for `--noise-genomes` of them each
rung is repeated with two more seeds (model initialisation, shuffling and the split all change with it).
Everything goes through the package's evaluator into one MLflow store (--tracking-uri), so a stopped
study resumes where it stopped. Writes docs/bench_fidelity.csv (one row per genome: each rung's
validation accuracy, the retrain's validation and test accuracy) and docs/bench_fidelity_noise.csv, and
prints Spearman and Kendall rank correlations of each rung with the retrain and each rung's seed noise.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from scipy import stats

from fmnas_jax.backends import EvalSpec, InProcess, Workers, cpu_workers, opened
from fmnas_jax.cli import to_app_config
from fmnas_jax.evaluator import Evaluator
from fmnas_jax.genome import count_params, sample_population
from fmnas_jax.jobs.search import rung_specs
from fmnas_jax.store import Store


def evaluate_all(store: Store, spec: EvalSpec, genomes: list, backend) -> dict:
    """genome -> validation accuracy at one budget (trained on the backend unless the store has it)."""
    outcomes = Evaluator(store, spec, backend).evaluate_many(genomes)
    return {g: o.metric("val_accuracy") for g, o in outcomes.items()}


def report(path: Path, noise_path: Path) -> None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rungs = sorted(k for k in rows[0] if k.startswith("rung"))
    target = np.array([float(r["retrain_test_accuracy"]) for r in rows])
    print(f"{len(rows)} genomes; rank correlation with the {rows[0]['retrain_epochs']}-epoch retrain's test accuracy:")
    print("| budget | Spearman | Kendall | seed noise (sd of validation accuracy over 3 seeds) |\n|---|---|---|---|")
    noise: dict[str, list[float]] = {}
    if noise_path.exists():
        with noise_path.open(newline="") as f:
            by: dict[tuple[str, str], list[float]] = {}
            for r in csv.DictReader(f):
                by.setdefault((r["budget"], r["genome"]), []).append(float(r["val_accuracy"]))
        for (budget, _), values in by.items():
            if len(values) > 1:
                noise.setdefault(budget, []).append(statistics.stdev(values))
    for k in [*rungs, "retrain_val_accuracy"]:
        x = np.array([float(r[k]) for r in rows])
        rho, tau = stats.spearmanr(x, target).statistic, stats.kendalltau(x, target).statistic
        sd = f"{100 * statistics.fmean(noise[k]):.2f} points (n={len(noise[k])})" if k in noise else "—"
        print(f"| {k} | {rho:.3f} | {tau:.3f} | {sd} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genomes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=11, help="draws the genomes")
    ap.add_argument("--retrain-epochs", type=int, default=30)
    ap.add_argument("--noise-genomes", type=int, default=8, help="genomes whose rungs are repeated with 2 more seeds")
    ap.add_argument("--tracking-uri", default="sqlite:///bench_fidelity.db")
    ap.add_argument("--csv", default="docs/bench_fidelity.csv")
    ap.add_argument("--noise-csv", default="docs/bench_fidelity_noise.csv")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        return report(Path(args.csv), Path(args.noise_csv))

    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        cfg = to_app_config(compose("config", overrides=["+experiment=hillclimb"]))
    genomes = sample_population(cfg.search_space, args.genomes, np.random.default_rng(args.seed))
    specs = rung_specs(cfg)
    store = Store(args.tracking_uri, "bench_fidelity")
    final = EvalSpec(replace(cfg.final.trainer(cfg.trainer), epochs=args.retrain_epochs, save=False), cfg.final.data(cfg.data), 0)
    names = [f"rung{r}_val_accuracy" for r in range(len(specs))]
    values: dict[str, dict] = {}
    noisy = genomes[: args.noise_genomes]
    noise_rows = []
    with opened(Workers(cpu_workers(), None)) as pool:
        for name, spec in zip(names, specs, strict=True):
            values[name] = evaluate_all(store, spec, genomes, pool)
            print(f"{name}: done", flush=True)
            for seed in (1, 2):
                other = evaluate_all(store, replace(spec, seed=seed), noisy, pool)
                noise_rows += [(name, str(g), seed, other[g]) for g in noisy]
            noise_rows += [(name, str(g), 0, values[name][g]) for g in noisy]
    retrain = Evaluator(store, final, InProcess(fused=True))
    out = Path(args.csv)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["genome", "params", *names, "retrain_epochs", "retrain_val_accuracy", "retrain_test_accuracy"])
        for i, g in enumerate(genomes):
            o = retrain.evaluate(g)
            w.writerow([str(g), count_params(g), *(f"{values[n][g]:.4f}" for n in names), args.retrain_epochs,
                        f"{o.metric('val_accuracy'):.4f}", f"{o.metric('test_accuracy'):.4f}"])  # fmt: skip
            f.flush()
            print(f"retrained {i + 1}/{len(genomes)}: {g} {100 * o.metric('test_accuracy'):.2f}% test", flush=True)
    with Path(args.noise_csv).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "genome", "seed", "val_accuracy"])
        w.writerows(noise_rows)
    report(out, Path(args.noise_csv))


if __name__ == "__main__":
    sys.exit(main())
