"""How well the main job's rungs rank genomes: each rung's validation accuracy against a long retrain's test accuracy.

    .venv/bin/python bench/bench_fidelity.py                      # 30 genomes, the main job's rungs, 30-epoch retrains
    .venv/bin/python bench/bench_fidelity.py --genomes 12 --retrain-epochs 10 --noise-genomes 4   # a quick look
    .venv/bin/python bench/bench_fidelity.py --report             # the table from bench/results/bench_fidelity.csv only
    .venv/bin/python bench/bench_fidelity.py --candidates 1x4000,2x4000,3x4000   # also rank budgets that are not rungs

Genomes are drawn uniformly from the main job's space (`+experiment=hillclimb`: at most 16,598 parameters),
so good and bad ones both appear. Each is evaluated at every rung of the main job (read from its config;
today 1 epoch on 10,000 images, 2 on 10,000, 3 on 20,000) on the worker pool, and retrained with the main job's final recipe
(`--retrain-epochs` on all 55,000, label smoothing 0.1) on the same pool; for `--noise-genomes` of them each
rung is repeated with two more seeds (model initialisation, shuffling and the split all change with it).
`--candidates EPOCHSxIMAGES,...` adds budgets that are not the main job's (columns `cand_<E>x<N>_val_accuracy`),
measured the same way, to choose a rung from: a cheaper rung is worth its place if its top third holds the
retrain's top third (the promotion ASHA makes) and its seed noise is small against the gaps it must rank.
Everything goes through the package's evaluator into one MLflow store (--tracking-uri), so a stopped
study resumes where it stopped; the CSVs are the study's memory too (the store need not survive), matched
by budget, so after the main job's rungs change an earlier rung's column is kept by naming its budget in
--candidates. Writes bench/results/bench_fidelity.csv (one row per genome: each rung's
validation accuracy, the retrain's validation and test accuracy) and bench/results/bench_fidelity_noise.csv, and
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
from bench_recipe import cpu_name  # the same lscpu model name the recipe benchmark prints
from hydra import compose, initialize_config_module
from scipy import stats

from fmnas_jax.backends import EvalSpec, Workers, cpu_workers, opened
from fmnas_jax.cli import to_app_config
from fmnas_jax.evaluator import Evaluator
from fmnas_jax.genome import count_params, sample_population
from fmnas_jax.jobs.search import rung_specs
from fmnas_jax.store import Store


def evaluate_all(store: Store, spec: EvalSpec, genomes: list, backend) -> dict:
    """genome -> validation accuracy at one budget (trained on the backend unless the store has it)."""
    outcomes = Evaluator(store, spec, backend).evaluate_many(genomes)
    return {g: o.metric("val_accuracy") for g, o in outcomes.items()}


def top_third_overlap(x: np.ndarray, target: np.ndarray) -> float:
    """Share of the target's top third that x's top third holds (what an eta=3 promotion keeps)."""
    k = max(1, len(x) // 3)
    return len(set(np.argsort(-x)[:k]) & set(np.argsort(-target)[:k])) / k


def budget_images(name: str, rows: list[dict]) -> str:
    """'1 x 4,000' for a candidate column; the main job's rungs are read from rung_budgets in the CSV."""
    if name.startswith("cand_"):
        e, n = candidate_budget(name)
        return f"{e} x {n:,}"
    return rows[0].get(name.replace("_val_accuracy", "_budget"), "")


def report(path: Path, noise_path: Path) -> None:
    with path.open(newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if all(v != "" for k, v in r.items() if k.endswith("_val_accuracy") and k.startswith(("rung", "cand_")))
        ]
    rungs = sorted(k for k in rows[0] if k.startswith("rung") and k.endswith("_val_accuracy"))
    rungs += sorted((k for k in rows[0] if k.startswith("cand_")), key=budget_cost)
    top = rungs[len([k for k in rungs if k.startswith("rung")]) - 1]  # the search's own budget, the last rung
    retrained = [r for r in rows if r.get("retrain_test_accuracy")]
    noise: dict[str, list[float]] = {}
    if noise_path.exists():
        with noise_path.open(newline="") as f:
            by: dict[tuple[str, str], list[float]] = {}
            for r in csv.DictReader(f):
                by.setdefault((r["budget"], r["genome"]), []).append(float(r["val_accuracy"]))
        for (budget, _), values in by.items():
            if len(values) > 1:
                noise.setdefault(budget, []).append(statistics.stdev(values))
    cpus = sorted({r.get("retrain_cpu") or EARLIER_CPU for r in retrained})
    epochs = retrained[0]["retrain_epochs"] if retrained else "-"
    print(f"{len(rows)} genomes with every budget, {len(retrained)} retrained ({epochs} epochs on {' and '.join(cpus) or '-'}); "
          f"rank correlations with the retrain's test accuracy and with the top rung ({top}):")  # fmt: skip
    print("| budget | epochs x images | Spearman (retrain) | Kendall (retrain) | top third kept (retrain) | Spearman (top rung) "
          "| top third kept (top rung) | seed noise (sd over 3 seeds) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for k in [*rungs, "retrain_val_accuracy"]:
        cells = []
        if retrained and k in retrained[0]:
            x, t = (np.array([float(r[c]) for r in retrained]) for c in (k, "retrain_test_accuracy"))
            cells += [f"{stats.spearmanr(x, t).statistic:.3f}", f"{stats.kendalltau(x, t).statistic:.3f}", f"{top_third_overlap(x, t):.2f}"]
        else:
            cells += ["—"] * 3
        if k not in ("retrain_val_accuracy", top):
            x, t = (np.array([float(r[c]) for r in rows]) for c in (k, top))
            cells += [f"{stats.spearmanr(x, t).statistic:.3f}", f"{top_third_overlap(x, t):.2f}"]
        else:
            cells += ["—"] * 2
        cells.append(f"{100 * statistics.fmean(noise[k]):.2f} points (n={len(noise[k])})" if k in noise else "—")
        cost = budget_images(k, rows) if k != "retrain_val_accuracy" else ""
        print(f"| {k} | {cost} | {' | '.join(cells)} |")


def candidate_budget(name: str) -> tuple[int, int]:
    """(epochs, images) of a candidate column, cand_<E>x<N>_val_accuracy."""
    e, n = name[len("cand_") : -len("_val_accuracy")].split("x")
    return int(e), int(n)


def budget_cost(name: str) -> int:
    e, n = candidate_budget(name)
    return e * n


def parse_candidates(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, text.split(",")):
        try:
            e, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--candidates {part!r}: write EPOCHSxIMAGES, e.g. 2x4000") from None
        if e < 1 or n < 10:
            raise SystemExit(f"--candidates {part!r}: epochs must be >= 1 and images >= 10")
        out.append((e, n))
    return out


EARLIER_CPU = "AMD EPYC (family 26 model 2)"  # the first look's machine, before the CSV named it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genomes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=11, help="draws the genomes")
    ap.add_argument("--retrain-epochs", type=int, default=30)
    ap.add_argument("--noise-genomes", type=int, default=8, help="genomes whose rungs are repeated with 2 more seeds")
    ap.add_argument("--tracking-uri", default="sqlite:///bench_fidelity.db")
    ap.add_argument("--csv", default="bench/results/bench_fidelity.csv")
    ap.add_argument("--noise-csv", default="bench/results/bench_fidelity_noise.csv")
    ap.add_argument("--candidates", default="", help="extra budgets EPOCHSxIMAGES,... ranked like the rungs")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    candidates = parse_candidates(args.candidates)
    if args.report:
        return report(Path(args.csv), Path(args.noise_csv))

    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        cfg = to_app_config(compose("config", overrides=["+experiment=hillclimb"]))
    genomes = sample_population(cfg.search_space, args.genomes, np.random.default_rng(args.seed))
    specs = rung_specs(cfg)
    store = Store(args.tracking_uri, "bench_fidelity")
    final = EvalSpec(replace(cfg.final.trainer(cfg.trainer), epochs=args.retrain_epochs, save=False), cfg.final.data(cfg.data), 0)
    names = [f"rung{r}_val_accuracy" for r in range(len(specs))]
    described = [f"{s.trainer.epochs} x {s.data.train_size or 55000:,}" for s in specs]
    for e, n in candidates:
        if f"{e} x {n:,}" in described:
            raise SystemExit(f"--candidates {e}x{n} is one of the main job's rungs ({', '.join(described)}); measured already")
        specs.append(replace(specs[0], trainer=replace(specs[0].trainer, epochs=e), data=replace(specs[0].data, train_size=n)))
        names.append(f"cand_{e}x{n}_val_accuracy")
    noisy = genomes[: args.noise_genomes]
    out, noise_out = Path(args.csv), Path(args.noise_csv)
    earlier, earlier_noise = _read(out), _read(noise_out)  # what a stopped study (whose store may be gone) measured
    # Earlier measurements are matched by their budget (epochs x images), not their column: when the main job's rungs
    # change, a value measured as rung 0 at 1 x 4,000 is a candidate's now, and a candidate's may be a rung's.
    by_budget = earlier_by_budget(earlier, earlier_noise)
    budget_of = dict(zip(names, [*described, *(budget_images(n, []) for n in names[len(described) :])], strict=True))
    values: dict[str, dict] = {n: dict(by_budget[0].get(budget_of[n], {})) for n in names}
    noise = {(n, g, seed): v for n in names for (g, seed), v in by_budget[1].get(budget_of[n], {}).items()}
    retrains = {r["genome"]: (float(r["retrain_val_accuracy"]), float(r["retrain_test_accuracy"]), r.get("retrain_cpu") or EARLIER_CPU)
                for r in earlier if r.get("retrain_test_accuracy") and int(r["retrain_epochs"]) == args.retrain_epochs}  # fmt: skip
    dropped = sorted(set(by_budget[0]) - set(budget_of.values()))
    if dropped:
        print(f"{out} has budgets this study does not measure ({', '.join(dropped)}); give them as --candidates to keep them", flush=True)

    def write() -> None:
        rung_budgets = [f"rung{r}_budget" for r in range(len(described))]
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            retrain_columns = ["retrain_epochs", "retrain_val_accuracy", "retrain_test_accuracy", "retrain_cpu"]
            w.writerow(["genome", "params", *names, *rung_budgets, *retrain_columns])
            for g in genomes:
                val, test, where = retrains.get(str(g), (None, None, ""))
                w.writerow([str(g), count_params(g), *(_fmt(values[n].get(str(g))) for n in names), *described, args.retrain_epochs,
                            _fmt(val), _fmt(test), where])  # fmt: skip
        with noise_out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["budget", "genome", "seed", "val_accuracy"])
            w.writerows((b, g, seed, _fmt(v)) for (b, g, seed), v in sorted(noise.items()))

    cheapest_first = sorted(zip(names, specs, strict=True), key=lambda ns: ns[1].trainer.epochs * (ns[1].data.train_size or 55000))
    with opened(Workers(cpu_workers(), None)) as pool:
        for name, spec in cheapest_first:  # a stopped study has its cheap columns first
            todo = [g for g in genomes if str(g) not in values[name]]
            values[name] |= {str(g): v for g, v in evaluate_all(store, spec, todo, pool).items()}
            for g in noisy:
                noise[(name, str(g), 0)] = values[name][str(g)]
            for seed in (1, 2):
                todo = [g for g in noisy if (name, str(g), seed) not in noise]
                noise |= {(name, str(g), seed): v for g, v in evaluate_all(store, replace(spec, seed=seed), todo, pool).items()}
            write()
            print(f"{name}: done (written to {out})", flush=True)
        todo = [g for g in genomes if str(g) not in retrains]
        print(f"retrains: {len(genomes) - len(todo)} read from {out} ({args.retrain_epochs} epochs), {len(todo)} to train", flush=True)
        here = cpu_name()

        def retrained(o) -> None:
            retrains[str(o.genome)] = (o.metric("val_accuracy"), o.metric("test_accuracy"), here)
            write()
            print(f"retrained {len(retrains)}/{len(genomes)}: {o.genome} {100 * o.metric('test_accuracy'):.2f}% test", flush=True)

        Evaluator(store, final, pool).evaluate_many(todo, on_done=retrained)
    report(out, noise_out)


def earlier_by_budget(rows: list[dict], noise_rows: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """What earlier CSVs measured, keyed by budget ('1 x 4,000'): ({budget: {genome: val}}, {budget: {(genome, seed): val}}).

    A rung column's budget is its row's `rung<i>_budget`; a candidate column's is in its name. The noise CSV names
    columns only, so its rung budgets are those of the main CSV's rows (one study writes both).
    """
    values: dict[str, dict] = {}
    column_budget: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            if not (k.startswith(("rung", "cand_")) and k.endswith("_val_accuracy")):
                continue
            budget = budget_images(k, [r])
            if not budget:
                raise SystemExit(f"{k} of {r['genome']!r} has no budget column ({k.replace('_val_accuracy', '_budget')})")
            column_budget.setdefault(k, budget)
            if column_budget[k] != budget:
                raise SystemExit(f"{k} holds two budgets across rows ({column_budget[k]}, {budget}); the CSV mixes two studies")
            if v:
                values.setdefault(budget, {})[r["genome"]] = float(v)
    noise: dict[str, dict] = {}
    for r in noise_rows:
        budget = column_budget.get(r["budget"]) or (budget_images(r["budget"], []) if r["budget"].startswith("cand_") else None)
        if budget is None:
            raise SystemExit(f"the noise CSV's {r['budget']!r} names no budget of the main CSV")
        noise.setdefault(budget, {})[(r["genome"], int(r["seed"]))] = float(r["val_accuracy"])
    return values, noise


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
