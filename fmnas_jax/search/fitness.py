"""Fitness: accuracy traded against size (and optionally training compute), and the Pareto front of (params, accuracy).

    fitness = accuracy_weight * accuracy - size_weight * log2(params / reference_params)
                                         - compute_weight * log2(train FLOPs per image / reference_flops)

With the defaults (1.0, 0.01, 16598, compute_weight 0) doubling the parameter count must buy one
percentage point of accuracy. Under a time budget a genome that trains twice as fast gets twice the
retraining epochs; compute_weight > 0 lets the search weigh that (0.01: doubling the FLOPs must buy
one point). Failed evaluations (NaN accuracy) get -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

METRICS = ("val_accuracy", "test_accuracy", "train_accuracy")
# With rungs (successive halving), a genome screened out at rung r scores its rung-r fitness minus RUNG_PENALTY per
# rung below the top: larger than any fitness difference (accuracies are in [0, 1], size terms ~0.1).
RUNG_PENALTY = 10.0


@dataclass(frozen=True)
class FitnessConfig:
    """What the search maximises; see the module docstring for the formula."""

    metric: str = "val_accuracy"
    accuracy_weight: float = 1.0
    size_weight: float = 0.01
    reference_params: int = 16598
    compute_weight: float = 0.0
    reference_flops: float = 9_822_336  # the paper's genome: training FLOPs per image (genome.train_flops_per_image)
    paper_reproduction: bool = False  # the only setting under which test accuracy may be optimised

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"fitness.metric {self.metric!r} is not one of {list(METRICS)}")
        if self.metric == "test_accuracy" and not self.paper_reproduction:
            raise ValueError(
                "fitness.metric 'test_accuracy' selects on the test set; it is allowed only with "
                "fitness.paper_reproduction=true (+experiment=paper). Use 'val_accuracy'."
            )
        for name in ("accuracy_weight", "size_weight", "compute_weight", "reference_flops"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"fitness.{name} {value!r} must be a finite number")
        if self.accuracy_weight <= 0:
            raise ValueError(f"fitness.accuracy_weight {self.accuracy_weight} must be > 0")
        if self.size_weight < 0:
            raise ValueError(f"fitness.size_weight {self.size_weight} must be >= 0 (0 ignores size)")
        if self.compute_weight < 0:
            raise ValueError(f"fitness.compute_weight {self.compute_weight} must be >= 0 (0 ignores training compute)")
        if self.reference_flops <= 0:
            raise ValueError(f"fitness.reference_flops {self.reference_flops} must be > 0")
        if self.reference_params < 1:
            raise ValueError(f"fitness.reference_params {self.reference_params} must be >= 1")


def fitness(cfg: FitnessConfig, accuracy: float, params: int, flops: float | None = None) -> float:
    """Scalar fitness of one evaluation (higher is better); -inf if it failed. `flops`: training FLOPs per image."""
    if accuracy is None or not math.isfinite(accuracy):
        return -math.inf
    value = cfg.accuracy_weight * accuracy - cfg.size_weight * math.log2(params / cfg.reference_params)
    if cfg.compute_weight and flops:
        value -= cfg.compute_weight * math.log2(flops / cfg.reference_flops)
    return value


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
