"""Same-shape genomes: one vmapped program (fmnas_jax.batched) vs one genome after another.

    .venv/bin/python bench/bench_batched.py --models 8 --train-size 5000 --epochs 1
    python3 bench/bench_batched.py --data-dir .data/fashion-mnist --models 16 --train-size 55000   # on a GPU

Takes the activation-only neighbours of a genome (they share its shapes), trains them both ways on the
same data and prints wall times, genomes/hour and the largest difference in final validation accuracy.
"""

from __future__ import annotations

import argparse
import time

import jax

from fmnas_jax import Genome, SearchSpace
from fmnas_jax.batched import signature, train_batched
from fmnas_jax.data import FashionMnistData, load
from fmnas_jax.genome import neighbours
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genome", default=PAPER)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()

    g = Genome.parse(args.genome)
    same = [g] + [n for n in neighbours(g, SearchSpace()) if signature(n) == signature(g)]
    genomes = same[: args.models]
    dd = to_device(load(FashionMnistData(train_size=args.train_size, val_size=1000, dir=args.data_dir), 0))
    cfg = TrainConfig(epochs=args.epochs)

    t = time.perf_counter()
    solo = [train_and_evaluate(x, dd, cfg, 0) for x in genomes]
    t_solo = time.perf_counter() - t
    t = time.perf_counter()
    batched = train_batched(genomes, dd, cfg, 0)
    t_batched = time.perf_counter() - t
    diff = max(abs(a.val_accuracy - b.val_accuracy) for a, b in zip(solo, batched, strict=True))
    m = len(genomes)
    print(f"{m} same-shape genomes of {g}; {args.epochs} epoch(s) on {args.train_size} images; {jax.default_backend()}")
    print(f"{'path':<28} {'wall s':>8} {'genomes/h':>10}")
    print(f"{'one after another':<28} {t_solo:>8.1f} {3600 * m / t_solo:>10.0f}")
    print(f"{'vmapped (batched.py)':<28} {t_batched:>8.1f} {3600 * m / t_batched:>10.0f}")
    print(f"summary: batched is {t_solo / t_batched:.2f}x one-after-another (compile included); max |val acc diff| {diff:.4f}")


if __name__ == "__main__":
    main()
