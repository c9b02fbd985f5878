"""What an evaluation will cost, known before training: a genome's FLOPs and the measured speed of this machine.

    seconds = overhead + images * (per_image + per_flop * FLOPs + per_activation * activations)

with FLOPs = `train_flops_per_image(genome)` and activations = `activation_elements(genome)` (wide
layers at full resolution are memory-bound: `NC 64 1` trains ~5x slower per image than `NC 4 2` at
fewer FLOPs on this CPU). Each measured evaluation gives its training speed directly
(`train_seconds / images_trained`), so the per-image terms are a non-negative least-squares fit to
those speeds, well posed even when every sample trained the same number of images (one rung); `overhead` (compiling, validating,
testing) is the median of `wall_seconds - train_seconds`. Samples come from this host's stored
evaluations and the search's own as they finish. With fewer than `MIN_SAMPLES` it uses priors
measured on a 2-core AMD EPYC (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from fmnas_jax.genome import FASHION_MNIST, Genome, ImageShape, activation_elements, train_flops_per_image

MIN_SAMPLES = 6
# Priors (2-core AMD EPYC, one single-threaded worker per core): ~2 s to compile and evaluate,
# ~0.1 ms per image of fixed cost, ~13 GFLOP/s of training compute per worker (the paper's genome,
# 9.8 MFLOP per image, at ~1,200 images/s).
PRIOR = (2.0, 1.0e-4, 1 / 1.3e10, 0.0)
# Two pinned single-threaded workers (the composed step) train ~1.05x the images/s of one process running the
# fused step on both cores (the final retrain), for the narrow genomes the main job picks: 2 x 5,703 against
# 11,096 and 2 x 4,430 against 8,253 images/s (2-core AMD EPYC, 2026-12-01, docs/benchmarks.md); so one
# in-process evaluation runs ~n/1.05 times faster than one worker's. (Wide genomes scale worse on threads.)
WORKERS_OVER_ONE_PROCESS = 1.05


@dataclass(frozen=True)
class Sample:
    """One measured evaluation: genome, images trained (epochs x images per epoch), seconds in all and training."""

    genome: Genome
    images: int
    seconds: float
    train_seconds: float


class CostModel:
    """Predicts an evaluation's wall seconds on one worker from its genome and images trained."""

    def __init__(self, samples: Iterable[Sample] = (), image: ImageShape = FASHION_MNIST) -> None:
        self.image = image  # the data's images: FLOPs and activations per image are counted for this shape
        self.samples: list[Sample] = [s for s in samples if _usable(s)]
        self.coef = PRIOR
        self._fit()

    @property
    def calibrated(self) -> bool:
        """Whether predictions come from this machine's measurements (`MIN_SAMPLES` of them) rather than the priors."""
        return len(self.samples) >= MIN_SAMPLES

    def add(self, sample: Sample) -> None:
        if _usable(sample):
            self.samples.append(sample)
            self._fit()

    def _fit(self) -> None:
        if not self.calibrated:
            return
        recent = self.samples[-500:]
        features = np.array([[1.0, *self._terms(s.genome)] for s in recent])
        per_image = np.array([s.train_seconds / s.images for s in recent])
        overhead = float(np.median([s.seconds - s.train_seconds for s in recent]))
        scale = np.maximum(features.max(axis=0), 1e-12)  # columns of similar size for the solver
        full = nnls(features / scale, per_image)[0] / scale  # non-negative: no term may make an image cheaper
        if full.sum() > 0:
            self.coef = (max(overhead, 0.0), float(full[0]), float(full[1]), float(full[2]))

    def seconds(self, genome: Genome, images: int) -> float:
        """Predicted wall seconds to train `genome` on `images` images (epochs included) and evaluate it."""
        overhead, per_image, per_flop, per_activation = self.coef
        flops, activations = self._terms(genome)
        return overhead + images * max(per_image + per_flop * flops + per_activation * activations, 1e-6)

    def _terms(self, genome: Genome) -> tuple[int, int]:
        return train_flops_per_image(genome, self.image), activation_elements(genome, self.image)


def _usable(s: Sample) -> bool:
    return s.images > 0 and s.train_seconds > 0 and s.seconds >= s.train_seconds


def parse_duration(value: str | int | float) -> float:
    """Seconds from 600, '600', '90s', '12m' or '1.5h'; ValueError names the value otherwise."""
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(
            f"duration {value!r} is not a number of seconds or a number followed by s, m or h (e.g. 600, '12m', '1.5h')"
        ) from None
    if not seconds > 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds
