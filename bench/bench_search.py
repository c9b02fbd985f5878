"""Search quality at the main job's budget: strategies x paired seeds, every winner retrained alike.

    .venv/bin/python bench/bench_search.py --seeds 0,1,2,3,4               # runs what bench/results/bench_search.csv lacks
    .venv/bin/python bench/bench_search.py --report                         # tables and figure from the CSVs only
    .venv/bin/python bench/bench_search.py --seeds 0 --strategies random --search-seconds 120   # a quick look

Every search is the main job (`+experiment=hillclimb`: the size cap, the rungs, asynchronous halving) with
its strategy swapped, through the CLI. Seeds are paired: seed s sets `search.seed=s` and `seed=s` for
every strategy (the same random population, initialisations and data split), and differs across seeds.
Each strategy has its own MLflow store under --workdir (experiment `bench_search`), so no search reuses
another strategy's results: they spend equal compute. Each search gets the main job's search phase
(--search-seconds; its retrain inside the budget is one epoch, unused), then its winner is retrained
outside the budgets, all alike (the main job's final recipe, --retrain-epochs on all 55,000 images, one
seed) into one shared store, so a winner two searches share trains once.

Each finished (strategy, seed) appends a row to --csv (bench/results/bench_search.csv) and its anytime curve
(best top-rung validation accuracy against the search's wall-clock seconds) to --anytime-csv, so a
stopped benchmark continues where it stopped. The table and the figure come from the CSVs alone.

--replay: the searches finished already in --workdir's stores; run them again with the code of now (a finished
search resumed from its store retraces its path and trains nothing), e.g. after a change to how a strategy picks
its winner, which leaves every search's path as it was. A row's evaluations and seconds are the first attempt's.
Statistics: bench/benchstats.py (Student-t 95 % intervals; differences paired by seed).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bench_recipe import cpu_name  # the same lscpu model name, family and model the other benchmarks print
from benchstats import (  # bench/benchstats.py: this folder is sys.path[0] when the script runs
    BASELINE,
    Row,
    anytime_means,
    append_row,
    mean_interval,
    objective_on_test,
    paired_differences,
    pairs_needed,
    read_rows,
    rows_of_cpu,
    summary_table,
)
from mlflow import MlflowClient

MAIN = "hillclimb+asha+mingain"  # what +experiment=hillclimb runs (since 2026-12-05; hillclimb+asha before)
# The variants whose settings lost and were retired (search.explore, search.min_gain_rungs, search.confirm,
# search.radius) keep their rows in bench/results/*.csv; they can no longer be run.
STRATEGIES = {
    "hillclimb+asha": ["search=hillclimb"],
    "evolution+asha": ["search=evolution"],
    "random+asha": ["search=random"],
    "tpe+asha": ["search=optuna", "search.sampler=tpe"],
    "random": ["search=random", "search/fidelity=none"],
    # A move only for a gain beyond the top rung's seed noise (0.80 points, the fidelity study): no chasing of noise.
    "hillclimb+asha+mingain": ["search=hillclimb_mingain"],  # = search=hillclimb search.min_gain=0.008
    # The size charge off (fitness.size_weight=0): the 16,598-parameter cap is the only limit on size, as the targets state
    # it (the main job charges 1 point of accuracy per doubling of parameters; retrained winners gain ~1.3 points per
    # doubling). The charge for training FLOPs stays: in the main job a cheaper genome retrains more epochs.
    "hillclimb+asha+nosize": ["search=hillclimb", "fitness.size_weight=0"],
    "random+asha+nosize": ["search=random", "fitness.size_weight=0"],
    # The main job's climb and random search without rungs, both with the parameter charge off (with it, the per-seed
    # difference follows the winners' size ratio, +1.06 points per doubling); the FLOPs charge still trades size.
    "hillclimb+asha+mingain+nosize": ["search=hillclimb_mingain", "fitness.size_weight=0"],
    "random+nosize": ["search=random", "search/fidelity=none", "fitness.size_weight=0"],
    # Both charges off: fitness is validation accuracy alone, what a fixed-epoch retrain measures (with the FLOPs
    # charge on, a climb may trade 2 points of accuracy for a fifth of the FLOPs that only a deadline retrain repays).
    "hillclimb+asha+mingain+accuracy": ["search=hillclimb_mingain", "fitness.size_weight=0", "fitness.compute_weight=0"],
    "random+accuracy": ["search=random", "search/fidelity=none", "fitness.size_weight=0", "fitness.compute_weight=0"],
}


def cli_run(cmd: list[str], workdir: Path, what: str) -> str:
    """Run one fmnas_jax job; returns the MLflow run id its result card prints (exits naming `what` on failure)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return next(line.split("(run ")[1].rstrip(")") for line in proc.stdout.splitlines() if line.startswith("MLflow: "))


def search(name: str, seed: int, args: argparse.Namespace) -> tuple[str, str]:
    """One search through the CLI; (its store's URI, the id of its in-budget final run)."""
    uri = f"sqlite:///{args.workdir / (name.replace('+', '_') + '.db')}"
    cmd = [sys.executable, "-m", "fmnas_jax", "+experiment=hillclimb", *STRATEGIES[name], f"search.seed={seed}", f"seed={seed}",
           f"search.time_budget={args.search_seconds + 20}", "final.epochs=1", "final.train_size=2000", "registry.model_name=null",
           f"tracking.uri={uri}", "tracking.experiment=bench_search", f"cache_dir={args.workdir / f'jax-cache-{name}-{seed}'}",
           "progress=false", *args.override]  # fmt: skip  # cold compilation cache each: equal footing
    return uri, cli_run(cmd, args.workdir, f"{name} seed {seed}")


def retrain(genome: str, args: argparse.Namespace) -> dict[str, float]:
    """The winner retrained outside every budget, all alike (reused when stored): its metrics."""
    uri = f"sqlite:///{args.workdir / 'retrain.db'}"
    cmd = [sys.executable, "-m", "fmnas_jax", "+experiment=train", f"genome={genome}", f"trainer.epochs={args.retrain_epochs}",
           "trainer.label_smoothing=0.1", "trainer.save=false", "data.train_size=null", f"seed={args.retrain_seed}",
           "registry.model_name=null", f"tracking.uri={uri}", "tracking.experiment=bench_search",
           f"cache_dir={args.workdir / 'jax-cache-retrain'}", "progress=false"]  # fmt: skip
    run_id = cli_run(cmd, args.workdir, f"retraining {genome}")
    return MlflowClient(uri).get_run(run_id).data.metrics


def describe(uri: str, final_run_id: str, replay: bool = False) -> tuple[object, object, list, list[tuple[float, float]]]:
    """(the search run, the attempt that trained its evaluations, its top-rung evaluations, its anytime curve
    [(seconds, best validation accuracy)]). Without `replay` both runs are the search run; with it, the search run is
    the newest finished run of the search_key and must have trained nothing, and the attempt is the first."""
    client = MlflowClient(uri)
    final = client.get_run(final_run_id)
    parent = client.get_run(final.data.tags["mlflow.parentRunId"])
    exp = parent.info.experiment_id
    first = parent
    if replay:  # the rerun is the newest attempt (its final run may be an earlier attempt's, reused: the same winner)
        attempts = client.search_runs([exp], f"tags.search_key = '{parent.data.tags['search_key']}' AND tags.`fmnas.role` = 'search' "
                                      "AND attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])  # fmt: skip
        first, parent = attempts[0], attempts[-1]
        if len(attempts) < 2 or parent.data.metrics.get("new_evaluations", 0) != 0:
            raise SystemExit(f"--replay: {uri} held no finished attempt of this search (the rerun trained "
                             f"{parent.data.metrics.get('new_evaluations', 0):.0f} evaluations); run it without --replay")  # fmt: skip
    evals = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{first.info.run_id}' AND tags.`fmnas.role` = 'evaluation' "
                               "AND attributes.status = 'FINISHED'", max_results=50000)  # fmt: skip
    rungs = {r.data.tags.get("fmnas.rung") for r in evals}
    top_tag = max(rungs, key=lambda t: -1 if t is None else int(t))
    top = sorted((r for r in evals if r.data.tags.get("fmnas.rung") == top_tag), key=lambda r: r.info.end_time)
    curve, best = [], -1.0
    for r in top:
        best = max(best, r.data.metrics.get("val_accuracy", -1.0))
        curve.append(((r.info.end_time - first.info.start_time) / 1000, best))
    return parent, first, top, curve


def run_missing(args: argparse.Namespace) -> None:
    here = cpu_name()
    done = {(r.strategy, r.seed) for r in read_rows(args.csv) if r.cpu == here}  # another CPU's rows are not this one's
    for seed in args.seeds:  # seeds outer: a stopped benchmark has every strategy on its first seeds
        for name in args.strategies:
            if (name, seed) in done:
                continue
            t0 = time.time()
            uri, final_id = search(name, seed, args)
            parent, first, top, curve = describe(uri, final_id, args.replay)
            winner = parent.data.tags["winner"]
            retrained = retrain(winner, args)
            m = first.data.metrics
            winner_top = [r for r in top if r.data.tags["genome"] == winner]
            row = Row(name, "yes" if name == MAIN else "no", seed, winner, int(retrained["param_count"]), retrained["val_accuracy"],
                      retrained["test_accuracy"], int(m.get("new_evaluations", 0)), float(m.get("search_seconds", 0.0)), len(top),
                      winner_top[0].data.metrics.get("val_accuracy", float("nan")) if winner_top else float("nan"),
                      parent.info.run_id, here)  # fmt: skip
            append_row(args.csv, row)
            new = not Path(args.anytime_csv).exists()
            with open(args.anytime_csv, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["strategy", "seed", "seconds", "best_val_accuracy", "cpu"])
                w.writerows([name, seed, f"{s:.1f}", f"{a:.4f}", here] for s, a in curve)
            print(f"{name} seed {seed}: {winner} {row.params:,} params, {100 * row.test_accuracy:.2f}% test after the retrain, "
                  f"{row.evaluations} evaluations, {time.time() - t0:.0f} s", flush=True)  # fmt: skip


def _ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "none"


def figure(anytime_csv: Path, out: Path, seconds: float, cpus: list[str], strategies: list[str] | None = None) -> None:
    """Mean of the best top-rung validation accuracy so far, per strategy (`strategies`; None: every one in the CSV),
    over the seeds all of them ran on that CPU (anytime_means): one panel per CPU."""
    curves: dict[str, dict[str, dict[int, list[tuple[float, float]]]]] = {c: {} for c in cpus}
    with open(anytime_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("cpu", "") in curves and (strategies is None or r["strategy"] in strategies):
                by_seed = curves[r.get("cpu", "")].setdefault(r["strategy"], {}).setdefault(int(r["seed"]), [])
                by_seed.append((float(r["seconds"]), float(r["best_val_accuracy"])))
    grid = np.linspace(0, seconds, 200)
    fig, axes = plt.subplots(1, len(cpus), figsize=(8 * len(cpus), 5), dpi=120, squeeze=False, sharey=True)
    for ax, cpu in zip(axes[0], cpus, strict=True):
        shared, means = anytime_means(curves[cpu], grid)
        for name, mean in means.items():
            alone = sorted(set(curves[cpu][name]) - set(shared))
            note = f"; {_ranges(alone)} left out: not run by all drawn" if alone else ""
            ax.plot(grid, 100 * mean, label=f"{name} (seeds {_ranges(shared)}{note})", lw=2 if name == MAIN else 1.2)
        ax.set(xlabel="search wall-clock seconds", title=f"{cpu or 'CPU not recorded'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("best top-rung validation accuracy so far (%)")
    fig.suptitle("anytime curves at the main job's budget (mean over paired seeds, one panel per CPU)")
    fig.tight_layout()
    fig.savefig(out)
    print(f"figure: {out.resolve()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {list(STRATEGIES)}")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--search-seconds", type=int, default=600, help="each search's wall-clock seconds (the main job's search phase)")
    ap.add_argument("--retrain-epochs", type=int, default=30, help="every winner retrained alike for this many epochs")
    ap.add_argument("--retrain-seed", type=int, default=0)
    ap.add_argument("--csv", default="bench/results/bench_search.csv")
    ap.add_argument("--anytime-csv", default=None, help="the anytime curves (default: beside --csv, as <stem>_anytime.csv)")
    ap.add_argument("--out", default=None, help="the figure (default: beside --csv, as <stem>.png)")
    ap.add_argument("--workdir", default="bench_search_work", help="the stores and compilation caches")
    ap.add_argument("--report", action="store_true", help="run nothing: the table and figure from the CSVs")
    ap.add_argument("--replay", action="store_true", help="rerun searches that finished in --workdir's stores (they train nothing)")
    ap.add_argument("--cpu", default=None, help="report the rows of this CPU only (as the CSV's cpu column names it; default: every CPU)")
    ap.add_argument(
        "--anytime-strategies",
        default="",
        help="the strategies the figure draws, as A,B,... (default: every one; each panel averages the seeds all of them ran)",
    )
    ap.add_argument("--compare", default="", help="more paired differences to report, as A:B,... (A minus B, pairs within a seed and CPU)")
    ap.add_argument("override", nargs="*", help="more Hydra overrides for every search")
    args = ap.parse_args()
    args.strategies, args.seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    stem = Path(args.csv).with_suffix("")  # another benchmark's CSV never appends to, or redraws, this one's files
    args.anytime_csv = args.anytime_csv or f"{stem}_anytime.csv"
    args.out = args.out or f"{stem}.png"
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; allowed: {list(STRATEGIES)}")
    args.workdir = Path(args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.report:
        print(f"{len(args.strategies)} strategies x seeds {args.seeds}, {args.search_seconds} s of search each; stores in {args.workdir}")
        run_missing(args)
    every = read_rows(args.csv)
    counts, names = Counter(r.cpu for r in every), list(dict.fromkeys(r.strategy for r in every))
    cpus = [c for c, _ in counts.most_common()]
    if args.cpu is not None and args.cpu not in counts:
        raise SystemExit(f"{args.csv} has no rows for CPU {args.cpu!r}; it has rows for {cpus}")
    if args.cpu is None:
        print(f"every CPU's rows ({', '.join(f'{c}: {n}' for c, n in counts.items())}); differences paired within one seed on one CPU, "
              "means over rows of several CPUs:")  # fmt: skip
        print(summary_table(every, BASELINE))
    for cpu in [args.cpu] if args.cpu is not None else cpus:
        rows = rows_of_cpu(every, cpu)[1]
        print(f"rows measured on {cpu or 'a CPU not recorded'}:")
        print(summary_table(rows, BASELINE))
        for r in rows:
            print(f"  {r.strategy} seed {r.seed}: {r.winner} {r.params:,} params, {100 * r.test_accuracy:.2f}% test, {r.evaluations} evals")
    for pair in filter(None, args.compare.split(",")):
        a, _, b = pair.partition(":")
        if a not in names or b not in names:
            raise SystemExit(f"--compare {pair!r}: give two strategies as A:B, from those {args.csv} has: {names}")
        for what, key in (("test accuracy", "test_accuracy"), ("objective on test accuracy", objective_on_test)):
            per_seed = paired_differences(every, a, b, key)
            d = mean_interval(list(per_seed.values()))
            seeds = ", ".join(f"seed {s}: {100 * v:+.2f}" for (s, _), v in per_seed.items())
            print(f"{a} minus {b}, {what}, paired, in points: {d.points()} ({seeds})" if d.n else f"{a} minus {b}: no paired seeds")
            if d.n >= 2:
                n = pairs_needed(list(per_seed.values()))
                print(f"  paired seeds for its 95 % interval to lie above 0 (80 % power, were the mean and sd as measured): "
                      f"{n if n is not None else 'none would (mean not above 0, or over 100,000)'}")  # fmt: skip
    if Path(args.anytime_csv).exists():
        drawn = [n for n in args.anytime_strategies.split(",") if n] or None
        if drawn is not None and (unknown := sorted(set(drawn) - set(names))):
            raise SystemExit(f"--anytime-strategies: {unknown} not in {args.csv}; it has: {names}")
        figure(Path(args.anytime_csv), Path(args.out), args.search_seconds, [args.cpu] if args.cpu is not None else cpus, drawn)


if __name__ == "__main__":
    main()
