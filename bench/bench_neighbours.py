"""What the climb's rungs and steps can tell apart: one-gene neighbours against their parent, from bench_search's stores.

    .venv/bin/python bench/bench_neighbours.py --stores /tmp/bench_acc_c*/hillclimb*.db --csv bench/results/bench_neighbours.csv
    .venv/bin/python bench/bench_neighbours.py --report --csv bench/results/bench_neighbours.csv   # the numbers from the CSV alone
    .venv/bin/python bench/bench_neighbours.py --radius 2 --stores /tmp/bench_acc_d*/hillclimb*.db \
        --csv bench/results/bench_neighbours_radius2.csv

Reads every finished evaluation of the climbs that bench/bench_search.py ran (one MLflow store per search, experiment
`bench_search`) and writes one CSV row per (climb, genome, rung): its validation accuracy, when it ran, and whether it is
a population member (the first --population genomes trained at rung 0) or a genome the climb asked later; for a later
genome at the top rung, its parent: the genome within --radius one-gene moves (fmnas_jax.genome.neighbours, repeated;
the radius the climbs used) whose top-rung result ended last before it started, and how many moves apart they are. The
report gives
- neighbour minus parent at the top rung, by moves apart: is a step a real gain, and how often is it beyond `min_gain`;
- the rank correlation (Spearman, values centred per climb) of each lower rung with the top rung, among population
  members (random genomes: what the rungs were chosen for) and among the climb's later genomes (near-equal neighbours:
  what a cheaper climb step would have to rank).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from scipy.stats import spearmanr

from fmnas_jax.genome import Genome, SearchSpace, neighbours, parse_genome

FIELDS = ["climb", "genome", "rung", "val_accuracy", "start_ms", "end_ms", "group", "parent", "parent_val_accuracy", "moves"]


def within(genome: Genome, space: SearchSpace, radius: int) -> dict[str, int]:
    """Every genome within `radius` one-gene moves of `genome` -> the fewest moves to it."""
    near, ring = {str(genome): 0}, [genome]
    for k in range(1, radius + 1):
        ring = [n for g in ring for n in neighbours(g, space) if str(n) not in near]
        near.update({str(n): k for n in ring if str(n) not in near})
    del near[str(genome)]
    return near


def extract(store: Path, population: int, radius: int = 1) -> list[dict[str, object]]:
    """One climb's evaluations as CSV rows (see the module docstring)."""
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("bench_search")
    if exp is None:
        raise SystemExit(f"{store}: no experiment 'bench_search' (not a store of bench/bench_search.py)")
    runs = client.search_runs([exp.experiment_id], "tags.`fmnas.role` = 'evaluation' AND attributes.status = 'FINISHED'",
                              max_results=50000, order_by=["attributes.start_time ASC"])  # fmt: skip
    evals = [r for r in runs if r.data.tags.get("fmnas.rung") is not None and "val_accuracy" in r.data.metrics]
    if not evals:
        raise SystemExit(f"{store}: no finished evaluation with a rung (only searches with rungs can be read)")
    top = max(int(r.data.tags["fmnas.rung"]) for r in evals)
    first: list[str] = []
    for r in evals:
        if r.data.tags["fmnas.rung"] == "0" and r.data.tags["genome"] not in first:
            first.append(r.data.tags["genome"])
    members = set(first[:population])
    at_top = [r for r in evals if int(r.data.tags["fmnas.rung"]) == top]
    tops = [(r.info.end_time, r.data.tags["genome"], r.data.metrics["val_accuracy"]) for r in at_top]
    space, rows = SearchSpace(), []
    for r in evals:
        genome, rung = r.data.tags["genome"], int(r.data.tags["fmnas.rung"])
        row = {"climb": f"{store.parent.name}/{store.stem}", "genome": genome, "rung": rung, "val_accuracy": r.data.metrics["val_accuracy"],
               "start_ms": r.info.start_time, "end_ms": r.info.end_time, "group": "population" if genome in members else "climb",
               "parent": "", "parent_val_accuracy": "", "moves": ""}  # fmt: skip
        if rung == top and genome not in members:
            near = within(parse_genome(genome, space), space, radius)  # genome -> moves away
            parents = [t for t in tops if t[0] <= r.info.start_time and t[1] in near]
            if parents:
                _, row["parent"], row["parent_val_accuracy"] = max(parents)
                row["moves"] = near[row["parent"]]
        rows.append(row)
    return rows


def report(rows: list[dict[str, str]]) -> None:
    """The two findings of the module docstring, in points of validation accuracy."""
    climbs = sorted({r["climb"] for r in rows})
    print(f"{len(climbs)} climbs, {len(rows)} evaluations")
    with_parent = [r for r in rows if r["parent"]]
    for moves in sorted({int(r.get("moves") or 1) for r in with_parent}):  # CSVs before --radius: one move
        d = 100 * np.array(
            [float(r["val_accuracy"]) - float(r["parent_val_accuracy"]) for r in with_parent if int(r.get("moves") or 1) == moves]
        )
        sd = f"{d.std(ddof=1):.2f}" if len(d) > 1 else "n/a"
        print(f"neighbour {moves} move(s) away minus parent, top-rung validation accuracy: n = {len(d)}, mean {d.mean():+.2f}, sd {sd} "
              f"points; above the parent: {int((d > 0).sum())}, by more than 0.8 points (min_gain): {int((d > 0.8).sum())}")  # fmt: skip
    val: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    group = {}
    for r in rows:
        val[r["climb"], r["genome"]][int(r["rung"])] = float(r["val_accuracy"])
        group[r["climb"], r["genome"]] = r["group"]
    top = max(int(r["rung"]) for r in rows)
    for name in ("population", "climb"):
        for low in range(top):
            xs, ys = [], []
            for climb in climbs:
                pairs = [(v[low], v[top]) for k, v in val.items() if k[0] == climb and group[k] == name and low in v and top in v]
                if len(pairs) >= 2:
                    a = np.array(pairs)
                    xs.extend(a[:, 0] - a[:, 0].mean())
                    ys.extend(a[:, 1] - a[:, 1].mean())
            rho = spearmanr(xs, ys).statistic if len(xs) >= 3 else float("nan")
            print(f"{name} genomes: rung {low} against the top rung, Spearman {rho:+.2f} (n = {len(xs)}, centred per climb)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", nargs="*", default=[], help="the climbs' sqlite stores (bench_search's --workdir/<strategy>.db)")
    ap.add_argument("--population", type=int, default=18, help="the searches' search.population_size (the main job's: 18)")
    ap.add_argument("--radius", type=int, default=1, help="the climbs' search.radius: a parent is this many one-gene moves away at most")
    ap.add_argument("--csv", default="bench/results/bench_neighbours.csv")
    ap.add_argument("--report", action="store_true", help="read nothing: the numbers from --csv alone")
    args = ap.parse_args()
    if not args.report:
        if not args.stores:
            raise SystemExit("--stores: name at least one store (or --report to read --csv)")
        rows = [row for s in args.stores for row in extract(Path(s), args.population, args.radius)]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        print(f"{len(rows)} rows -> {args.csv}")
    with open(args.csv, newline="") as f:
        report(list(csv.DictReader(f)))


if __name__ == "__main__":
    main()
