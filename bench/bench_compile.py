"""What a new genome costs before its first step, and how fast its step then runs, as a search sees it.

    taskset -c 0 .venv/bin/python bench/bench_compile.py                  # one pinned single-threaded worker
    PYTHONPATH=/path/to/older/checkout taskset -c 0 .venv/bin/python bench/bench_compile.py   # the same for older code

A worker of the main job evaluates a random population and then a climb's neighbours, one after the
other in one process. This replays that: `--population` random genomes of the main job's space, then
`--neighbours` one-gene neighbours of the first, each compiled (as `train.compiled_programs` does for
an evaluation) and then timed over `--steps` train steps on real Fashion-MNIST batches. Prints one
line per genome and a summary line (mean compile seconds of each group, geometric-mean images/s);
`--json` writes them too. XLA runs single-threaded as in a worker (set before jax is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax.data import FashionMnistData, load
from fmnas_jax.genome import SearchSpace, neighbours, sample_population
from fmnas_jax.train import TrainConfig, compiled_programs, epoch_order, init_state, to_device


def measure(genome, dd, cfg: TrainConfig, steps: int) -> tuple[float, float]:
    """(seconds compiling this genome's programs, images/s of its train step)."""
    t0 = time.perf_counter()
    programs = compiled_programs(genome, cfg, dd)
    compile_seconds = time.perf_counter() - t0
    state, key, lr = init_state(genome, cfg, 0), jax.random.key(1), np.float32(1e-3)
    perm = epoch_order(jax.random.key(0), 0, dd)
    acc = jnp.zeros(2)
    for i in range(2):  # first dispatches
        state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, key, lr, 0, i)
    acc.block_until_ready()
    t0 = time.perf_counter()
    for i in range(steps):
        state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, key, lr, 0, i)
    acc.block_until_ready()
    return compile_seconds, steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--neighbours", type=int, default=12)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--max-params", type=int, default=16598)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    dd = to_device(load(FashionMnistData(train_size=10000), 0))
    cfg = TrainConfig(epochs=1)
    space = SearchSpace(max_params=args.max_params)
    rng = np.random.default_rng(args.seed)
    population = sample_population(space, args.population, rng)
    nbrs = neighbours(population[0], space)
    chosen = [nbrs[int(i)] for i in rng.permutation(len(nbrs))[: args.neighbours]]
    measure(sample_population(SearchSpace(), 1, np.random.default_rng(999))[0], dd, cfg, 2)  # the process's first compile
    rows = []
    for group, genomes in (("random", population), ("neighbour", chosen)):
        for g in genomes:
            c, ips = measure(g, dd, cfg, args.steps)
            rows.append({"group": group, "genome": str(g), "compile_seconds": c, "images_per_second": ips})
            print(f"{group:9s} {g!s:66s} compile {c:5.2f} s  {ips:7.0f} images/s", flush=True)
    summary = {g: float(np.mean([r["compile_seconds"] for r in rows if r["group"] == g])) for g in ("random", "neighbour")}
    summary["geomean_images_per_second"] = float(np.exp(np.mean([np.log(r["images_per_second"]) for r in rows])))
    print(f"summary: compile random {summary['random']:.2f} s, neighbour {summary['neighbour']:.2f} s; "
          f"step {summary['geomean_images_per_second']:.0f} images/s (geometric mean); jax {jax.__version__}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
