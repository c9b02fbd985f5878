"""What each part of the training recipe adds on one genome (default: the paper's), real data.

    .venv/bin/python bench/bench_recipe.py --epochs 15
    .venv/bin/python bench/bench_recipe.py --epochs 20 --recipes base,crop+flip+ls --genome 'NC 4 5 sigmoid;...'

Each recipe trains the genome from the same seed on all 55,000 training images and reports
validation and test accuracy and images/s, as a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from dataclasses import replace

from fmnas_jax.data import FashionMnistData, load
from fmnas_jax.genome import PAPER_GENOME, Genome, count_params
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

RECIPES = {
    "base": {},
    "flip": {"augment_flip": True},
    "ls": {"label_smoothing": 0.1},
    "crop": {"augment_crop": 2},
    "crop+ls": {"augment_crop": 2, "label_smoothing": 0.1},
    "crop1+ls": {"augment_crop": 1, "label_smoothing": 0.1},
    "crop+flip": {"augment_crop": 2, "augment_flip": True},
    "flip+ls": {"augment_flip": True, "label_smoothing": 0.1},
    "crop+flip+ls": {"augment_crop": 2, "augment_flip": True, "label_smoothing": 0.1},
    "crop+flip+ls+wd": {"augment_crop": 2, "augment_flip": True, "label_smoothing": 0.1, "optimizer": "adamw", "weight_decay": 0.05},
}


def cpu_name() -> str:
    """lscpu's model name with its family and model: "AMD EPYC" alone names machines of very different speed."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    if "CPU family" in fields and "Model" in fields:
        name += f" (family {fields['CPU family']} model {fields['Model']})"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genome", default=PAPER_GENOME)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--recipes", default="base,crop+flip,crop+flip+ls,crop+flip+ls+wd", help=f"comma-separated, from {list(RECIPES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    genome = Genome.parse(args.genome)
    dd = to_device(load(FashionMnistData(), args.seed))
    print(f"{genome} ({count_params(genome):,} params), {args.epochs} epochs on 55,000 images, seed {args.seed}, CPU: {cpu_name()}")
    print("| recipe | train acc | val acc | test acc | images/s |\n|---|---|---|---|---|")
    for name in args.recipes.split(","):
        cfg = replace(TrainConfig(epochs=args.epochs, learning_rate=args.lr), **RECIPES[name])
        r = train_and_evaluate(genome, dd, cfg, args.seed)
        accs = " | ".join(f"{100 * a:.2f}%" for a in (r.train_accuracy, r.val_accuracy, r.test_accuracy))
        print(f"| {name} | {accs} | {r.images_per_second:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
