"""A population of genomes: one process (all cores) vs pinned worker processes, genomes/hour and compile share.

    .venv/bin/python bench/bench_population.py --genomes 24 --train-size 4000 --epochs 1
    .venv/bin/python bench/bench_population.py --genomes 120 --train-size 2000 --epochs 1 --modes pool
    .venv/bin/python bench/bench_population.py --genomes 24 --train-size 4000 --epochs 1 --modes pool,ray   # backend=ray

Each mode runs in fresh processes with its own empty persistent compilation cache, then runs the
same population again on that cache (the 'warm' rows: a second run compiles almost nothing).
No MLflow is involved: this times the evaluation path the search uses (fmnas_jax.backends).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
import numpy as np
from fmnas_jax.data import FashionMnistData
from fmnas_jax.genome import SearchSpace, sample_population
from fmnas_jax.train import TrainConfig
genomes = sample_population(SearchSpace(), cfg["genomes"], np.random.default_rng(cfg["seed"]))
trainer = TrainConfig(epochs=cfg["epochs"], batch_size=128)
data = FashionMnistData(train_size=cfg["train_size"], val_size=cfg["val_size"], dir=cfg["data_dir"])
from fmnas_jax.backends import Buckets, Devices, EvalSpec, InProcess, Workers
from fmnas_jax.runtime import enable_compilation_cache
enable_compilation_cache(cfg["cache"])
t0 = time.perf_counter()
if cfg["mode"] == "devices":
    import jax
    backend = Devices(jax.devices(), per_device=cfg["workers"])
elif cfg["mode"] == "buckets":  # masked buckets (fmnas_jax.batched): one vmapped program per group
    import jax
    backend = Buckets(jax.devices()[0], max_models=cfg["workers"], max_waste=cfg["max_waste"])
elif cfg["mode"] == "ray":  # a local Ray cluster (started here) with --workers CPUs, one task per evaluation
    import ray
    ray.init(num_cpus=cfg["workers"], include_dashboard=False)
    from fmnas_jax.backends.ray_tasks import Ray
    backend = Ray(None, num_cpus=1, cache_dir=cfg["cache"])
elif cfg["workers"] > 1:
    backend = Workers(cfg["workers"], cfg["cache"])
else:
    backend = InProcess()
started = time.perf_counter() - t0
results = [r for _, r in backend.evaluate(genomes, EvalSpec(trainer, data, 0))]
wall = time.perf_counter() - t0
backend.close()
if cfg["mode"] == "ray":
    ray.shutdown()
print(json.dumps({"wall": wall, "compile": sum(r.compile_seconds for r in results), "train": sum(r.train_seconds for r in results),
                  "hits": sum(r.cache_hits for r in results), "failed": sum(r.status != "FINISHED" for r in results),
                  "val": [r.val_accuracy for r in results], "start": started, "images": sum(r.images_trained for r in results),
                  "inside": sum(r.wall_seconds for r in results), "slots": getattr(backend, "parallelism", 1)}))
"""


def run_mode(mode: str, workers: int, cache: str, args: argparse.Namespace) -> dict:
    spec = {"genomes": args.genomes, "seed": args.seed, "epochs": args.epochs, "train_size": args.train_size,
            "val_size": args.val_size, "workers": workers, "cache": cache, "mode": mode, "data_dir": args.data_dir,
            "max_waste": args.max_waste}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genomes", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--modes",
        default="single,pool",
        help="comma list: single (one process), pool (pinned CPU workers), devices (DevicePool, --workers programs per device), "
        "buckets (masked buckets of up to --workers genomes, one vmapped program each), "
        "ray (backend=ray on a local Ray cluster of --workers CPUs; needs the ray extra)",
    )
    p.add_argument("--max-waste", type=float, default=2.0, help="buckets: allowed compute of a bucket / its genomes alone")
    p.add_argument("--cold-only", action="store_true", help="skip the second (warm cache) run of each mode")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    rows = {}
    for mode in args.modes.split(","):
        workers = 1 if mode == "single" else args.workers
        with tempfile.TemporaryDirectory() as cache:
            cold = run_mode(mode, workers, cache, args)
            warm = None if args.cold_only else run_mode(mode, workers, cache, args)
        rows[mode] = (cold, warm)

    date = time.strftime("%Y-%m-%d")
    print(f"{args.genomes} random genomes, {args.epochs} epoch(s) on {args.train_size} images, val {args.val_size}; {date}")
    print(f"{'mode':<34} {'wall s':>8} {'genomes/h':>10} {'images/s':>9} {'start s':>8} {'overhead s':>10} {'compile s':>10} "
          f"{'compile %':>10} {'cache hits':>10}")  # fmt: skip
    for mode, (cold, warm) in rows.items():
        for tag, r in (("cold cache", cold), ("warm cache", warm)):
            if r is None:
                continue
            share = 100 * r["compile"] / max(r["compile"] + r["train"], 1e-9)
            name = f"{mode} ({1 if mode == 'single' else args.workers}), {tag}"
            per_hour = 3600 * args.genomes / r["wall"]
            # overhead: slot-seconds not spent inside an evaluation, per evaluation (backend start excluded)
            overhead = ((r["wall"] - r["start"]) * r["slots"] - r["inside"]) / args.genomes
            print(f"{name:<34} {r['wall']:>8.1f} {per_hour:>10.0f} {r['images'] / r['wall']:>9.0f} {r['start']:>8.1f} {overhead:>10.2f} "
                  f"{r['compile']:>10.1f} {share:>9.1f}% {r['hits']:>10}")  # fmt: skip
    if "single" in rows and "pool" in rows:
        speedup = rows["single"][0]["wall"] / rows["pool"][0]["wall"]
        print(f"summary: {args.workers} pinned workers evaluate {speedup:.2f}x the genomes/hour of one process (cold caches)")
    for mode in ("buckets", "devices", "ray"):
        if mode in rows and len(rows) > 1:
            base = next(m for m in rows if m != mode)
            speedup = rows[base][0]["wall"] / rows[mode][0]["wall"]
            print(f"summary: {mode} evaluates {speedup:.2f}x the genomes/hour of {base} (cold caches)")
    if args.json:
        Path(args.json).write_text(json.dumps({m: {"cold": c, "warm": w} for m, (c, w) in rows.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
