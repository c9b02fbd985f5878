"""What an evaluation will cost, known before training: a genome's FLOPs and the measured speed of this machine.

    seconds = overhead + images * (per_image + per_flop * train_flops_per_image(genome))

Each measured evaluation gives its training speed directly (`train_seconds / images_trained`), so
`per_image + per_flop * FLOPs` is a least-squares line through those speeds, well posed even when
every sample trained the same number of images (one rung); `overhead` (compiling, validating,
testing) is the median of `wall_seconds - train_seconds`. Samples come from this host's stored
evaluations and the search's own as they finish. With fewer than `MIN_SAMPLES` it uses priors
measured on a 2-core AMD EPYC (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, train_flops_per_image

MIN_SAMPLES = 6
# Priors (2-core AMD EPYC, one single-threaded worker per core): ~2 s to compile and evaluate,
# ~0.1 ms per image of fixed cost, ~13 GFLOP/s of training compute per worker (the paper's genome,
# 9.8 MFLOP per image, at ~1,200 images/s).
PRIOR = (2.0, 1.0e-4, 1 / 1.3e10)
# Two pinned single-threaded workers evaluate ~1.2x the images/s of one process using both cores
# (docs/benchmarks.md), so one in-process evaluation runs ~n/1.2 times faster than one worker's.
WORKERS_OVER_ONE_PROCESS = 1.2


@dataclass(frozen=True)
class Sample:
    """One measured evaluation: genome, images trained (epochs x images per epoch), seconds in all and training."""

    genome: Genome
    images: int
    seconds: float
    train_seconds: float


class CostModel:
    """Predicts an evaluation's wall seconds on one worker from its genome and images trained."""

    def __init__(self, samples: Iterable[Sample] = ()) -> None:
        self.samples: list[Sample] = [s for s in samples if _usable(s)]
        self.coef = PRIOR
        self._fit()

    def add(self, sample: Sample) -> None:
        if _usable(sample):
            self.samples.append(sample)
            self._fit()

    def _fit(self) -> None:
        if len(self.samples) < MIN_SAMPLES:
            return
        recent = self.samples[-500:]
        flops = np.array([train_flops_per_image(s.genome) for s in recent], float)
        per_image = np.array([s.train_seconds / s.images for s in recent])
        overhead = float(np.median([s.seconds - s.train_seconds for s in recent]))
        if np.ptp(flops) > 0:
            slope, intercept = np.polyfit(flops, per_image, 1)
        else:
            slope, intercept = 0.0, float(per_image.mean())
        if slope < 0 or intercept <= 0:  # noise on a narrow range of FLOPs: fall back to a line through the origin
            slope, intercept = float(np.sum(flops * per_image) / np.sum(flops * flops)), 0.0
        self.coef = (max(overhead, 0.0), float(intercept), float(slope))

    def seconds(self, genome: Genome, images: int) -> float:
        """Predicted wall seconds to train `genome` on `images` images (epochs included) and evaluate it."""
        overhead, per_image, per_flop = self.coef
        return overhead + images * max(per_image + per_flop * train_flops_per_image(genome), 1e-6)


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
