"""Fitness: accuracy traded against size, and the Pareto front of (params, accuracy).

    fitness = accuracy_weight * accuracy - size_weight * log2(params / reference_params)

With the defaults (1.0, 0.01, 16598) doubling the parameter count must buy one percentage
point of accuracy. Failed evaluations (NaN accuracy) get -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

METRICS = ("val_accuracy", "test_accuracy", "train_accuracy")


@dataclass(frozen=True)
class FitnessConfig:
    """What the search maximises; see the module docstring for the formula."""

    metric: str = "val_accuracy"
    accuracy_weight: float = 1.0
    size_weight: float = 0.01
    reference_params: int = 16598
    paper_reproduction: bool = False  # the only setting under which test accuracy may be optimised

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"fitness.metric {self.metric!r} is not one of {list(METRICS)}")
        if self.metric == "test_accuracy" and not self.paper_reproduction:
            raise ValueError(
                "fitness.metric 'test_accuracy' selects on the test set; it is allowed only with "
                "fitness.paper_reproduction=true (+experiment=paper). Use 'val_accuracy'."
            )
        for name in ("accuracy_weight", "size_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"fitness.{name} {value!r} must be a finite number")
        if self.accuracy_weight <= 0:
            raise ValueError(f"fitness.accuracy_weight {self.accuracy_weight} must be > 0")
        if self.size_weight < 0:
            raise ValueError(f"fitness.size_weight {self.size_weight} must be >= 0 (0 ignores size)")
        if self.reference_params < 1:
            raise ValueError(f"fitness.reference_params {self.reference_params} must be >= 1")


def fitness(cfg: FitnessConfig, accuracy: float, params: int) -> float:
    """Scalar fitness of one evaluation (higher is better); -inf if it failed."""
    if accuracy is None or not math.isfinite(accuracy):
        return -math.inf
    return cfg.accuracy_weight * accuracy - cfg.size_weight * math.log2(params / cfg.reference_params)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (params, accuracy) points, by ascending params.

    A point is dominated if another has no more params and no less accuracy, and is
    strictly better in one of them. Points with non-finite accuracy are never on the front.
    """
    order = sorted(
        (i for i, (_, a) in enumerate(points) if a is not None and math.isfinite(a)),
        key=lambda i: (points[i][0], -points[i][1]),
    )
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
