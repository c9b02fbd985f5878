"""Search quality at equal compute: strategies x seeds, each under the same time budget, winners retrained alike.

    .venv/bin/python scripts/bench_search.py                      # 4 strategies x 3 seeds, 3 minutes each
    .venv/bin/python scripts/bench_search.py --seeds 0,1 --time-budget 5m --out docs/bench_search.png search.population_size=9
    .venv/bin/python scripts/bench_search.py --from-store --tracking-uri sqlite:///bench_search.db   # report again, no search

Every search is the main job (`+experiment=hillclimb`: the size cap, the rungs, the final recipe) with
its strategy swapped, run through the CLI into one MLflow experiment (`bench_search`, tracking URI
--tracking-uri). Each (strategy, seed) trains with its own `seed`, so no search reuses another's
results: they spend equal compute. Per strategy: mean +- standard deviation of the retrained winner's
test accuracy and parameters, and of the hypervolume of each search's (parameters, test accuracy)
front at the search budget (log10 parameters from the size cap down, accuracy from --hv-floor up).
Selection inside the searches uses validation accuracy only.

A short time budget leaves the searches' own retrain an epoch or so, too little to rank winners by; so
every distinct winner is also retrained outside the budgets, all alike (`--retrain-epochs` on all
55,000 images, label smoothing 0.1, one seed) through `+experiment=train` into the same experiment, and
the table reports that test accuracy beside the in-budget one. A winner two searches share is trained
once (the store reuses it). `--from-store` skips the searches and reports on those already in the store.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow import MlflowClient

STRATEGIES = {
    "hillclimb+halving": ["search=hillclimb", "search/fidelity=halving"],
    "hillclimb": ["search=hillclimb", "search/fidelity=none"],
    "evolution+halving": ["search=evolution", "search/fidelity=halving"],
    "random": ["search=random", "search/fidelity=none"],
}


def hypervolume(points: list[tuple[int, float]], max_params: int, floor: float) -> float:
    """Area dominated by (params, accuracy) points in (log10 params, accuracy), bounded by the cap and the floor."""
    pts = sorted((math.log10(p), a) for p, a in points if p <= max_params and a > floor and math.isfinite(a))
    area, best = 0.0, floor
    ref = math.log10(max_params)
    for i, (x, a) in enumerate(pts):
        best = max(best, a)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref
        area += (nxt - x) * (best - floor)
    return area


def run_one(name: str, seed: int, args: argparse.Namespace, index: int) -> str:
    """One search through the CLI; returns the id of its retrained winner's run."""
    cmd = [sys.executable, "-m", "fmnas_jax", "+experiment=hillclimb", *STRATEGIES[name], f"search.seed={seed}",
           f"seed={100 * index + seed}", f"search.time_budget={args.time_budget}", f"final.epochs={args.final_epochs}",
           f"final.train_size={args.final_train_size}", f"tracking.uri={args.tracking_uri}", "tracking.experiment=bench_search",
           f"cache_dir={Path(args.workdir).resolve() / f'jax-cache-{name}-{seed}'}",  # every search compiles from cold: equal footing
           "progress=false", *args.override]  # fmt: skip
    t0 = time.time()
    run_id = cli_run(cmd, args.workdir, f"{name} seed {seed}")
    print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return run_id


def cli_run(cmd: list[str], workdir: str, what: str) -> str:
    """Run one fmnas_jax job; returns the MLflow run id its result card prints (exits naming `what` on failure)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return next(line.split("(run ")[1].rstrip(")") for line in proc.stdout.splitlines() if line.startswith("MLflow: "))


def strategy_of(params: dict[str, str]) -> str | None:
    """The STRATEGIES name of a stored search run, from its logged settings."""
    want = {f"search={params.get('search.strategy')}", f"search/fidelity={params.get('search.fidelity.mode')}"}
    return next((name for name, overrides in STRATEGIES.items() if set(overrides) == want), None)


def stored_searches(client: MlflowClient, exp_id: str) -> list[tuple[str, int, str]]:
    """(strategy, search seed, final run id) of every finished search in the experiment, oldest first."""
    finals = client.search_runs([exp_id], "tags.`fmnas.role` = 'final' AND attributes.status = 'FINISHED'", max_results=5000)
    found = []
    for final in finals:
        parent = client.get_run(final.data.tags["mlflow.parentRunId"])
        if parent.info.status == "FINISHED" and (name := strategy_of(parent.data.params)) is not None:
            found.append((parent.info.start_time, name, int(parent.data.params["search.seed"]), final.info.run_id))
    return [(name, seed, run_id) for _, name, seed, run_id in sorted(found)]


def retrain(genome: str, args: argparse.Namespace, client: MlflowClient) -> float:
    """Test accuracy of `genome` retrained outside every search budget, all winners alike (reused if stored)."""
    cmd = [sys.executable, "-m", "fmnas_jax", "+experiment=train", f"genome={genome}", f"trainer.epochs={args.retrain_epochs}",
           "trainer.label_smoothing=0.1", "trainer.save=false", "data.train_size=null", f"seed={args.retrain_seed}",
           "registry.model_name=null", f"tracking.uri={args.tracking_uri}", "tracking.experiment=bench_search",
           f"cache_dir={Path(args.workdir).resolve() / 'jax-cache-retrain'}", "progress=false"]  # fmt: skip
    t0 = time.time()
    run_id = cli_run(cmd, args.workdir, f"retraining {genome}")
    test = client.get_run(run_id).data.metrics["test_accuracy"]
    print(f"  retrained {genome}: {100 * test:.2f}% test ({time.time() - t0:.0f} s)", flush=True)
    return test


def summarise(client: MlflowClient, exp_id: str, final_run_id: str, max_params: int, floor: float) -> dict:
    final = client.get_run(final_run_id)
    search = client.get_run(final.data.tags["mlflow.parentRunId"])
    evals = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{search.info.run_id}' AND attributes.status = 'FINISHED'",
                               max_results=5000)  # fmt: skip
    evals = [r for r in evals if r.info.run_id != final_run_id]
    rungs = {r.data.tags.get("fmnas.rung") for r in evals} - {None}
    top_tag = str(max(int(t) for t in rungs)) if rungs else None  # the search budget: the last rung, or the only one
    top = [r for r in evals if r.data.tags.get("fmnas.rung") == top_tag]
    points = [(int(r.data.metrics["param_count"]), r.data.metrics["test_accuracy"]) for r in top if "test_accuracy" in r.data.metrics]
    return {
        "test": final.data.metrics["test_accuracy"],
        "params": final.data.metrics["param_count"],
        "hv": hypervolume(points, max_params, floor),
        "evaluations": len(evals),
        "points": points,
        "winner": final.data.tags["genome"],
        "wall": (final.info.end_time - search.info.start_time) / 1000,
        "seed": int(search.data.params["search.seed"]),
        "time_budget": search.data.params.get("search.time_budget"),
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {list(STRATEGIES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--time-budget", default="3m", help="each search's search.time_budget (search and retrain)")
    ap.add_argument("--final-epochs", type=int, default=3)
    ap.add_argument("--final-train-size", type=int, default=20000)
    ap.add_argument("--max-params", type=int, default=16598, help="the main job's size cap (hypervolume reference)")
    ap.add_argument("--hv-floor", type=float, default=0.70)
    ap.add_argument("--tracking-uri", default="sqlite:///bench_search.db")
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--out", default="bench_search.png")
    ap.add_argument("--retrain-epochs", type=int, default=10, help="every winner retrained alike for this many epochs (0: no)")
    ap.add_argument("--retrain-seed", type=int, default=0)
    ap.add_argument("--from-store", action="store_true", help="run no search: report on the finished searches in the store")
    ap.add_argument("override", nargs="*", help="more Hydra overrides for every search, e.g. search.population_size=9")
    args = ap.parse_args()
    names, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.from_store:
        print(
            f"{len(names)} strategies x {len(seeds)} seeds, {args.time_budget} each; MLflow {args.tracking_uri} (experiment bench_search)"
        )
    results: dict[str, list[dict]] = {}
    client = MlflowClient(args.tracking_uri)
    if args.from_store:
        exp = client.get_experiment_by_name("bench_search")
        if exp is None:
            raise SystemExit(f"no experiment 'bench_search' in {args.tracking_uri}")
        runs = [(n, sd, run_id) for n, sd, run_id in stored_searches(client, exp.experiment_id) if n in names and sd in seeds]
        for name, _, run_id in runs:
            results.setdefault(name, []).append(summarise(client, exp.experiment_id, run_id, args.max_params, args.hv_floor))
        seeds = sorted({sd for _, sd, _ in runs})  # what the store has
        args.time_budget = "/".join(sorted({str(r["time_budget"]) for rows in results.values() for r in rows}))
        results = {n: results[n] for n in names if n in results}
    for seed in [] if args.from_store else seeds:  # seeds outer: a stopped benchmark still has every strategy on the first seeds
        for name in names:
            final_id = run_one(name, seed, args, list(STRATEGIES).index(name))
            exp_id = client.get_experiment_by_name("bench_search").experiment_id
            results.setdefault(name, []).append(summarise(client, exp_id, final_id, args.max_params, args.hv_floor))
    if args.retrain_epochs > 0:
        print(f"retraining every winner alike: {args.retrain_epochs} epochs on all training images, seed {args.retrain_seed}")
        retrained: dict[str, float] = {}
        for rows in results.values():
            for r in rows:
                if r["winner"] not in retrained:
                    retrained[r["winner"]] = retrain(r["winner"], args, client)
                r["in_budget_test"], r["test"] = r["test"], retrained[r["winner"]]

    again = f"test accuracy ({args.retrain_epochs}-epoch retrain)" if args.retrain_epochs > 0 else "test accuracy"
    print(f"\n| strategy | winner {again} | in-budget retrain | winner parameters | hypervolume | evaluations (all rungs) | wall |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        (ta, ts), (pa, ps), (ha, hs), (wa, ws) = (mean_sd([r[k] for r in rows]) for k in ("test", "params", "hv", "wall"))
        ia, is_ = mean_sd([r.get("in_budget_test", r["test"]) for r in rows])
        evals = statistics.mean(r["evaluations"] for r in rows)
        print(f"| {name} | {100 * ta:.2f} ± {100 * ts:.2f} % | {100 * ia:.2f} ± {100 * is_:.2f} % | {pa:,.0f} ± {ps:,.0f} "
              f"| {ha:.4f} ± {hs:.4f} | {evals:.0f} | {wa:.0f} ± {ws:.0f} s |")  # fmt: skip
    for name, rows in results.items():
        for r in rows:
            print(f"  {name} seed {r['seed']}: {r['winner']} {r['params']:,.0f} params, {100 * r['test']:.2f}% test, {r['wall']:.0f} s")

    how = f" ({args.retrain_epochs} epochs)" if args.retrain_epochs > 0 else ""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (name, rows), color in zip(results.items(), ("tab:red", "tab:orange", "tab:green", "tab:gray"), strict=False):
        pts = [p for r in rows for p in r["points"]]
        ax.scatter([p for p, _ in pts], [100 * a for _, a in pts], s=8, alpha=0.35, color=color)
        ax.scatter([r["params"] for r in rows], [100 * r["test"] for r in rows], marker="*", s=160, color=color, edgecolors="black",
                   label=f"{name}: winners retrained{how}")  # fmt: skip
    ax.set(xscale="log", xlabel="parameters (log scale)", ylabel="test accuracy (%)", ylim=(100 * args.hv_floor, None),
           title=f"equal compute ({args.time_budget} each, {len(seeds)} seeds); dots: evaluations at the search budget")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(Path(args.out))
    print(f"figure: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
