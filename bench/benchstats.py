"""What the strategy benchmark (bench/bench_search.py) computes from its CSV: intervals and paired differences.

One row per (strategy, seed): the search's winner and its test accuracy after a retrain done alike for
every winner. Seeds are paired across strategies (every strategy ran each seed's population), so a
strategy is compared with random search by the per-seed differences, which cancels most of the seed's
own luck. Intervals are Student-t 95 % intervals of a mean over seeds.

Winners are chosen by fitness (accuracy traded against size), not by accuracy alone, so a strategy can
win its objective with a smaller, less accurate network: the table gives both the paired difference in
test accuracy (the target) and in the objective computed on test accuracy (`objective_on_test`: the main job's fitness).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import stats

from fmnas_jax.genome import SearchSpace, parse_genome, train_flops_per_image
from fmnas_jax.search.fitness import FitnessConfig, fitness

BASELINE = "random+asha"  # what the other strategies are paired against (random search with the same rungs)


@dataclass(frozen=True)
class Row:
    """One benchmark search: its strategy, seed and winner, the winner's retrained accuracy, what it cost."""

    strategy: str
    main: str  # "yes" on the rows of the strategy +experiment=hillclimb uses
    seed: int
    winner: str
    params: int
    val_accuracy: float  # the retrain's validation accuracy
    test_accuracy: float  # the retrain's test accuracy (reported, never selected on)
    evaluations: int  # new evaluations the search trained, all rungs
    wall_seconds: float  # the search's wall-clock seconds
    top_rung_evaluations: int = 0
    search_val_accuracy: float = math.nan  # the winner's validation accuracy at the search's top rung
    search_run_id: str = ""
    cpu: str = ""  # lscpu's model name, family and model: wall-clock budgets make rows of two CPUs incomparable


def rows_of_cpu(rows: Sequence[Row], cpu: str | None = None) -> tuple[str, list[Row]]:
    """The rows measured on `cpu` (None: the CPU with the most rows), and that CPU's name.

    A search's budget is wall-clock seconds, so a slower CPU evaluates fewer genomes in it: means of one
    strategy are comparable within one CPU; paired differences pool CPUs (paired_difference).
    """
    if cpu is None:
        cpu = next((c for c, _ in Counter(r.cpu for r in rows).most_common(1)), "")
    return cpu, [r for r in rows if r.cpu == cpu]


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a benchmark CSV ([] if it does not exist yet)."""
    p = Path(path)
    if not p.exists():
        return []
    types = {f.name: f.type for f in fields(Row)}
    out = []
    with p.open(newline="") as f:
        for raw in csv.DictReader(f):
            values = {k: (int(v) if types[k] in ("int", int) else float(v) if types[k] in ("float", float) else v) for k, v in raw.items()}
            out.append(Row(**values))
    return out


def append_row(path: str | Path, row: Row) -> None:
    """Add one row (the header first if the file is new): a stopped benchmark keeps what it finished."""
    p = Path(path)
    new = not p.exists()
    with p.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        if new:
            w.writeheader()
        w.writerow(asdict(row))


MAIN_FITNESS = FitnessConfig(compute_weight=0.01)  # +experiment=hillclimb's, which every benchmark search runs under


def objective_on_test(row: Row, cfg: FitnessConfig = MAIN_FITNESS) -> float:
    """The search's objective on the retrain's test accuracy: size and training FLOPs (from the winner's genome) charged."""
    return fitness(cfg, row.test_accuracy, row.params, train_flops_per_image(parse_genome(row.winner, SearchSpace())))


Key = str | Callable[[Row], float]  # a Row attribute's name, or a function of a row


def _value(row: Row, key: Key) -> float:
    return key(row) if callable(key) else getattr(row, key)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def points(self) -> str:
        """A difference of fractions in points: '+0.64 (-0.48 .. +1.77), n=8'."""
        return f"{100 * self.mean:+.2f} ({100 * self.low:+.2f} .. {100 * self.high:+.2f}), n={self.n}"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and its Student-t interval (a single value: the interval is that value)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(values)
    if n == 1:
        return Interval(m, m, m, 1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def paired_differences(
    rows: Iterable[Row], strategy: str, baseline: str = BASELINE, key: Key = "test_accuracy"
) -> dict[tuple[int, str], float]:
    """(strategy - baseline) in `key` for every (seed, CPU) both ran, in seed order.

    A pair is one seed on one CPU: the two searches had the same population and the same seconds of the
    same machine. Pairs from several CPUs pool (the CPU is one more block, as the seed is); a seed the
    two strategies ran on different CPUs is no pair.
    """
    by = {(r.strategy, r.seed, r.cpu): _value(r, key) for r in rows}
    blocks = sorted({(s, c) for st, s, c in by if st == strategy} & {(s, c) for st, s, c in by if st == baseline})
    return {(s, c): by[strategy, s, c] - by[baseline, s, c] for s, c in blocks}


def paired_difference(rows: Iterable[Row], strategy: str, baseline: str = BASELINE, key: Key = "test_accuracy") -> Interval:
    """Mean over the (seed, CPU) pairs both ran of (strategy - baseline) in `key`, with its interval (paired_differences)."""
    return mean_interval(list(paired_differences(rows, strategy, baseline, key).values()))


def pairs_needed(differences: Sequence[float], power: float = 0.8, level: float = 0.95, most: int = 100_000) -> int | None:
    """Paired seeds a `level` interval of the mean difference needs to lie above 0 with probability `power`.

    The true mean and standard deviation taken to be those of `differences` (a paired t-test's power, from the
    noncentral t distribution, e.g. 34 pairs for an effect of half a standard deviation at 80 % power). None when the
    measured mean is not above 0 (no number of seeds makes such a strategy win) or more than `most` would be needed.
    """
    if len(differences) < 2:
        raise ValueError(f"pairs_needed: {len(differences)} differences; the noise needs at least 2")
    if not 0 < power < 1 or not 0 < level < 1:
        raise ValueError(f"pairs_needed: power {power} and level {level} must lie in (0, 1)")
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if mean <= 0:
        return None
    if sd == 0:
        return 2
    effect = mean / sd

    def reached(n: int) -> bool:
        return bool(stats.nct.sf(stats.t.ppf(0.5 + level / 2, n - 1), n - 1, effect * math.sqrt(n)) >= power)

    if not reached(most):
        return None
    low, high = 1, most  # reached(high), not reached(low): power grows with n
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return high


def anytime_means(
    curves: Mapping[str, Mapping[int, Sequence[tuple[float, float]]]], grid: np.ndarray
) -> tuple[list[int], dict[str, np.ndarray]]:
    """The seeds every strategy in `curves` ran, and per strategy the mean over those seeds of its anytime curve on `grid`.

    `curves[strategy][seed]` is a search's (seconds, best top-rung validation accuracy so far) points in time
    order: a step function, NaN before its first point, so a mean is NaN until every seed has a result (no dip
    at the start). Seeds only some strategies ran are left out: the curves are paired as the differences are.
    """
    shared = sorted(set.intersection(*(set(by_seed) for by_seed in curves.values()))) if curves else []
    means = {}
    for name, by_seed in curves.items():
        ys = []
        for seed in shared:
            t, a = np.array([p[0] for p in by_seed[seed]]), np.array([p[1] for p in by_seed[seed]])
            idx = np.searchsorted(t, grid, side="right") - 1
            ys.append(np.where(idx >= 0, a[np.clip(idx, 0, None)], np.nan))
        means[name] = np.array(ys).mean(axis=0) if ys else np.full(len(grid), np.nan)
    return shared, means


def summary_table(rows: Sequence[Row], baseline: str = BASELINE) -> str:
    """Markdown: per strategy, winner test accuracy and parameters with intervals, and the paired differences to
    `baseline` in test accuracy and in the objective on test accuracy (objective_on_test), both in points."""
    lines = [
        f"| strategy | seeds | winner test accuracy (95 % CI) | parameters | evaluations | minus {baseline}, paired (95 % CI) "
        "| objective minus the same, paired (95 % CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r.strategy for r in rows):
        mine = [r for r in rows if r.strategy == name]
        t, p = mean_interval([100 * r.test_accuracy for r in mine]), mean_interval([r.params for r in mine])
        e = statistics.fmean(r.evaluations for r in mine)
        main = " (main job)" if mine[0].main == "yes" else ""
        diffs = ["—", "—"]
        if name != baseline:
            for i, key in enumerate(("test_accuracy", objective_on_test)):
                d = paired_difference(rows, name, baseline, key)
                diffs[i] = d.points() if d.n else "no paired seeds"
        lines.append(f"| {name}{main} | {len(mine)} | {t.mean:.2f} ({t.low:.2f} .. {t.high:.2f}) % | {p.mean:,.0f} ± {p.half_width:,.0f} "
                     f"| {e:.0f} | {diffs[0]} | {diffs[1]} |")  # fmt: skip
    return "\n".join(lines) + "\n"
