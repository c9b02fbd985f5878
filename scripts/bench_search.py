"""Search quality at equal compute: strategies x seeds, each under the same time budget, winners retrained alike.

    .venv/bin/python scripts/bench_search.py                      # 4 strategies x 3 seeds, 3 minutes each
    .venv/bin/python scripts/bench_search.py --seeds 0,1 --time-budget 5m --out docs/bench_search.png search.population_size=9

Every search is the main job (`+experiment=hillclimb`: the size cap, the rungs, the final recipe) with
its strategy swapped, run through the CLI into one MLflow experiment (`bench_search`, tracking URI
--tracking-uri). Each (strategy, seed) trains with its own `seed`, so no search reuses another's
results: they spend equal compute. Per strategy: mean +- standard deviation of the retrained winner's
test accuracy and parameters, and of the hypervolume of each search's (parameters, test accuracy)
front at the search budget (log10 parameters from the size cap down, accuracy from --hv-floor up).
Selection inside the searches uses validation accuracy only.
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
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.workdir)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    run_id = next(line.split("(run ")[1].rstrip(")") for line in proc.stdout.splitlines() if line.startswith("MLflow: "))
    print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return run_id


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
    ap.add_argument("override", nargs="*", help="more Hydra overrides for every search, e.g. search.population_size=9")
    args = ap.parse_args()
    names, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    print(f"{len(names)} strategies x {len(seeds)} seeds, {args.time_budget} each; MLflow {args.tracking_uri} (experiment bench_search)")
    results: dict[str, list[dict]] = {}
    client = MlflowClient(args.tracking_uri)
    for seed in seeds:  # seeds outer: a stopped benchmark still has every strategy on the first seeds
        for name in names:
            final_id = run_one(name, seed, args, list(STRATEGIES).index(name))
            exp_id = client.get_experiment_by_name("bench_search").experiment_id
            results.setdefault(name, []).append(summarise(client, exp_id, final_id, args.max_params, args.hv_floor))

    print("\n| strategy | winner test accuracy | winner parameters | hypervolume | evaluations (all rungs) |\n|---|---|---|---|---|")
    for name, rows in results.items():
        (ta, ts), (pa, ps), (ha, hs) = (mean_sd([r[k] for r in rows]) for k in ("test", "params", "hv"))
        evals = statistics.mean(r["evaluations"] for r in rows)
        print(f"| {name} | {100 * ta:.2f} ± {100 * ts:.2f} % | {pa:,.0f} ± {ps:,.0f} | {ha:.4f} ± {hs:.4f} | {evals:.0f} |")
    for name, rows in results.items():
        for seed, r in zip(seeds, rows, strict=False):
            print(f"  {name} seed {seed}: {r['winner']} {r['params']:,.0f} params, {100 * r['test']:.2f}% test")

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (name, rows), color in zip(results.items(), ("tab:red", "tab:orange", "tab:green", "tab:gray"), strict=False):
        pts = [p for r in rows for p in r["points"]]
        ax.scatter([p for p, _ in pts], [100 * a for _, a in pts], s=8, alpha=0.35, color=color)
        ax.scatter([r["params"] for r in rows], [100 * r["test"] for r in rows], marker="*", s=160, color=color, edgecolors="black",
                   label=f"{name}: winners retrained")  # fmt: skip
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
