"""The paper's hill climber over a table of recorded evaluations sorted by parameter count.

From a random row: move left (fewer params) if the left row is more accurate; otherwise
move right if its fitness is higher, i.e. the accuracy gain is worth the extra parameters.
With size_weight >= 0 neither move can undo the other, so each climb ends. Restart at
random until `patience` restarts in a row bring no improvement. Trains nothing.

As a strategy (`TableClimber`, search=table): it asks for the population and nothing else; its result is the climb
over the table as it stands when the evaluations end (every recorded evaluation of the search's own budget in its
space, the population's and any earlier search's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace
from fmnas_jax.search.base import ClimbResult, Proposals, SearchConfig, Step, Strategy

Row = tuple[Genome, int, float, float]  # genome, params, accuracy, fitness


@dataclass(frozen=True)
class TableConfig(SearchConfig):
    """search=table: the paper's climber over the stored table (it trains nothing beyond the population)."""

    strategy: str = "table"
    budget: int | None = 0  # it trains nothing beyond the population
    patience: int = 2
    max_restarts: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patience < 1 or self.max_restarts < 0:
            raise ValueError(f"search.patience {self.patience} must be >= 1 and search.max_restarts {self.max_restarts} >= 0")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        if given.table is None:
            raise ValueError("search=table needs the stored table (Proposals.table)")
        return TableClimber(given.population, given.table, rng, self.patience, self.max_restarts)


def table_climb(rows: Sequence[Row], rng: np.random.Generator, patience: int, max_restarts: int = 1000) -> ClimbResult:
    """Climb `rows` of (genome, params, accuracy, fitness); returns the best row seen and the path."""
    if not rows:
        raise ValueError("the table climber needs at least one recorded evaluation")
    table = sorted(rows, key=lambda r: (r[1], str(r[0])))
    acc = [r[2] if math.isfinite(r[2]) else -math.inf for r in table]
    fit = [r[3] for r in table]
    best_i, best_f, stale, path = -1, -math.inf, 0, []
    for restart in range(max_restarts + 1):
        i = int(rng.integers(len(table)))
        climb = [Step(restart, 0, table[i][0], fit[i], "start")]
        for _ in range(len(table)):  # each move strictly improves accuracy or fitness: n moves at most
            if i > 0 and acc[i - 1] > acc[i]:
                i, move = i - 1, "left"
            elif i + 1 < len(table) and fit[i + 1] > fit[i]:
                i, move = i + 1, "right"
            else:
                break
            climb.append(Step(restart, len(climb), table[i][0], fit[i], move))
        climb.append(Step(restart, len(climb), table[i][0], fit[i], "optimum"))
        path += climb
        if fit[i] > best_f:
            best_i, best_f, stale = i, fit[i], 0
        else:
            stale += 1
            if stale >= patience:
                break
    return ClimbResult(table[best_i][0], best_f, tuple(path))


class TableClimber:
    """search=table as a Strategy: asks for `population`, then climbs the rows `table()` returns."""

    def __init__(self, population: Sequence[Genome], table: Callable[[], Sequence[Row]], rng: np.random.Generator, patience: int,
                 max_restarts: int) -> None:  # fmt: skip
        self._queue, self._table, self.rng = list(population), table, rng
        self.patience, self.max_restarts = patience, max_restarts
        self.done = False

    def ask(self) -> Genome | None:
        return self._queue.pop(0) if self._queue else None

    def tell(self, genome: Genome, fitness: float) -> None:
        """Results reach the table through the store, not through here."""

    def stop(self, why: str) -> None:
        self.done = True

    def result(self) -> ClimbResult:
        return table_climb(self._table(), self.rng, self.patience, self.max_restarts)
