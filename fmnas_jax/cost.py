"""What an evaluation will cost, known before training: a genome's FLOPs and the measured speed of this machine.

    seconds = overhead + images * (per_image + per_flop * train_flops_per_image(genome))

fitted by least squares to evaluations this host already measured (the store keeps `wall_seconds`
and `images_trained` for each), refitted as the search's own evaluations finish. With fewer than
`MIN_SAMPLES` measurements it uses priors measured on a 2-core AMD EPYC (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, train_flops_per_image

MIN_SAMPLES = 6
# Priors (2-core AMD EPYC, one single-threaded worker per core): ~2 s to compile and evaluate,
# ~0.1 ms per image of fixed cost, ~1.2 GFLOP/s of useful training compute per worker.
PRIOR = (2.0, 1.0e-4, 1 / 1.2e9)


@dataclass(frozen=True)
class Sample:
    """One measured evaluation: genome, images trained (epochs x images per epoch), wall seconds."""

    genome: Genome
    images: int
    seconds: float


class CostModel:
    """Predicts an evaluation's wall seconds on one worker from its genome and images trained."""

    def __init__(self, samples: Iterable[Sample] = ()) -> None:
        self.samples: list[Sample] = [s for s in samples if s.images > 0 and s.seconds > 0]
        self.coef = PRIOR
        self._fit()

    def add(self, sample: Sample) -> None:
        if sample.images > 0 and sample.seconds > 0:
            self.samples.append(sample)
            self._fit()

    def _fit(self) -> None:
        if len(self.samples) < MIN_SAMPLES:
            return
        recent = self.samples[-500:]
        flops = np.array([train_flops_per_image(s.genome) for s in recent], float)
        images = np.array([s.images for s in recent], float)
        a = np.stack([np.ones_like(images), images, images * flops], axis=1)
        y = np.array([s.seconds for s in recent])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        if np.all(np.isfinite(coef)) and coef[1] + coef[2] * flops.min() > 0:
            self.coef = (max(float(coef[0]), 0.0), float(coef[1]), max(float(coef[2]), 0.0))

    def seconds(self, genome: Genome, images: int) -> float:
        """Predicted wall seconds to train `genome` on `images` images (epochs included) and evaluate it."""
        overhead, per_image, per_flop = self.coef
        return overhead + images * max(per_image + per_flop * train_flops_per_image(genome), 1e-6)


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
