"""Figures, the results CSV and the result card (the paper's Fig. 1-3 and table, and more)."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fmnas_jax.genome import PAPER_GENOME
from fmnas_jax.search.fitness import pareto_front

PAPER_BEST = {"genome": PAPER_GENOME, "params": 16598, "test_accuracy": 0.8855}
CSV_COLUMNS = ("genome", "params", "train_accuracy", "test_accuracy", "val_accuracy", "fitness", "pareto", "source", "eval_key", "run_id",
               "rung")  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One evaluation as the report shows it."""

    genome: str
    params: int
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    fitness: float
    eval_key: str
    run_id: str
    source: str  # trained | reused
    rung: int | None = None  # multi-fidelity searches: the rung (the last is the search budget)


@dataclass(frozen=True)
class Card:
    """The winner, as printed and saved."""

    genome: str
    params: int
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    eval_key: str
    run_id: str
    tracking_uri: str
    budget: str
    data: str = "fashion_mnist: 28x28x1, 10 classes"  # the dataset's name, shape and classes

    def markdown(self) -> str:
        pct = lambda v: f"{100 * v:.2f}%" if math.isfinite(v) else "n/a"  # noqa: E731
        lines = [
            "# fmnas_jax result card",
            "",
            "| field | value |",
            "|---|---|",
            f"| genome | `{self.genome}` |",
            f"| parameters | {self.params:,} |",
            f"| train accuracy | {pct(self.train_accuracy)} |",
            f"| validation accuracy | {pct(self.val_accuracy)} |",
            f"| test accuracy | {pct(self.test_accuracy)} |",
            f"| data | {self.data} |",
            f"| budget | {self.budget} |",
            f"| eval_key | `{self.eval_key}` |",
            f"| MLflow run | `{self.run_id}` in `{self.tracking_uri}` |",
        ]
        if self.data.startswith("fashion_mnist:"):
            lines.append(f"| paper's best | {PAPER_BEST['params']:,} params, {100 * PAPER_BEST['test_accuracy']:.2f}% test |")
        return "\n".join(lines) + "\n"


def write_card(card: Card, out_dir: Path) -> list[Path]:
    """result_card.md and result_card.json."""
    md, js = out_dir / "result_card.md", out_dir / "result_card.json"
    md.write_text(card.markdown())
    js.write_text(json.dumps(asdict(card), indent=2) + "\n")
    return [md, js]


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """results.csv: the paper's columns (genome, params, train/test accuracy) plus validation and more."""
    front = set(pareto_front([(r.params, r.test_accuracy) for r in rows]))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in sorted(range(len(rows)), key=lambda j: rows[j].params):
            row = rows[r]
            w.writerow(
                [
                    row.genome,
                    row.params,
                    f"{row.train_accuracy:.4f}",
                    f"{row.test_accuracy:.4f}",
                    f"{row.val_accuracy:.4f}",
                    f"{row.fitness:.5f}",
                    int(r in front),
                    row.source,
                    row.eval_key,
                    row.run_id,
                    "" if row.rung is None else row.rung,
                ]
            )
    return path


def plot_search(rows: Sequence[Row], path_genomes: Sequence[str], winner: str, out: Path, title: str,
                final: tuple[int, float] | None = None, paper: bool = True) -> Path:  # fmt: skip
    """Params (log) vs test accuracy: every evaluation, the Pareto front, the climb path, winner (and its retrained score),
    and with `paper` the paper's best (Fashion-MNIST)."""
    top = max((r.rung for r in rows if r.rung is not None), default=None)
    screened = [r for r in rows if r.rung != top and math.isfinite(r.val_accuracy)]
    rows = [r for r in rows if r.rung == top]
    by_genome = {r.genome: r for r in rows}
    ok = [r for r in rows if math.isfinite(r.test_accuracy)]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for rung, marker in zip(sorted({r.rung for r in screened}), "v^<>", strict=False):
        pts = [r for r in screened if r.rung == rung]
        label = f"screened at rung {rung}: validation accuracy ({len(pts)})"
        ax.scatter([r.params for r in pts], [100 * r.val_accuracy for r in pts], s=14, marker=marker, facecolors="none",
                   edgecolors="tab:purple", alpha=0.35 + 0.2 * rung, label=label)  # fmt: skip
    ax.scatter([r.params for r in ok], [100 * r.test_accuracy for r in ok], s=18, c="tab:gray", alpha=0.6, label=f"evaluations ({len(ok)})")
    front = [ok[i] for i in pareto_front([(r.params, r.test_accuracy) for r in ok])]
    ax.step([r.params for r in front], [100 * r.test_accuracy for r in front], where="post", c="tab:blue", lw=1.5, label="Pareto front")
    climb = [by_genome[g] for g in path_genomes if g in by_genome and math.isfinite(by_genome[g].test_accuracy)]
    if climb:
        ax.plot([r.params for r in climb], [100 * r.test_accuracy for r in climb], "-o", c="tab:orange", ms=3, lw=1, alpha=0.8,
                label="climb path")  # fmt: skip
    if winner in by_genome:
        w = by_genome[winner]
        ax.scatter([w.params], [100 * w.test_accuracy], marker="*", s=260, c="tab:red", zorder=5,
                   label=f"winner (search budget): {w.params:,} params, {100 * w.test_accuracy:.2f}%")  # fmt: skip
    if final is not None and math.isfinite(final[1]):
        ax.scatter([final[0]], [100 * final[1]], marker="*", s=260, facecolors="none", edgecolors="tab:red", zorder=5,
                   label=f"winner retrained (final budget): {100 * final[1]:.2f}%")  # fmt: skip
    if paper:  # the paper's point belongs on Fashion-MNIST's plots only
        ax.scatter([PAPER_BEST["params"]], [100 * PAPER_BEST["test_accuracy"]], marker="D", s=60, c="black", zorder=5,
                   label="paper's best: 16,598 params, 88.55%")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_curves(history: dict[str, list[float]], genome: str, out: Path) -> Path:
    """The winner's train/validation accuracy and loss per epoch."""
    epochs = range(1, len(history.get("train_loss", [])) + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for split, style in (("train", "-o"), ("val", "-s")):
        a1.plot(epochs, [100 * v for v in history.get(f"{split}_accuracy", [])], style, ms=3, label=split)
        a2.plot(epochs, history.get(f"{split}_loss", []), style, ms=3, label=split)
    a1.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    a2.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(True, alpha=0.3)
        a.legend()
    fig.suptitle(genome, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], title: str, out: Path) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts and row-normalised colour."""
    import numpy as np

    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
