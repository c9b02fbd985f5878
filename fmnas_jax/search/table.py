"""The paper's hill climber over a table of recorded evaluations sorted by parameter count.

From a random row: move left (fewer params) if the left row is more accurate; otherwise
move right if its fitness is higher, i.e. the accuracy gain is worth the extra parameters.
With size_weight >= 0 neither move can undo the other, so each climb ends. Restart at
random until `patience` restarts in a row bring no improvement. Trains nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fmnas_jax.genome import Genome
from fmnas_jax.search.base import ClimbResult, Step


def table_climb(
    rows: Sequence[tuple[Genome, int, float, float]], rng: np.random.Generator, patience: int, max_restarts: int = 1000
) -> ClimbResult:
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
