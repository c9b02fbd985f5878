"""The training recipe an evaluation trains with (trainer.*): optimiser, schedule, epochs, batch, augmentation.

Plain settings, no JAX: the config layer imports them without the trainer (fmnas_jax.train) that uses them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fmnas_jax.ops import StepSettings

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training budget, optimiser and recipe; everything except `save` and `eval_batch_size` changes results."""

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    label_smoothing: float = 0.0
    augment_crop: int = 0  # random crop from the image padded by this many pixels (0 = off)
    augment_flip: bool = False  # random horizontal flip
    eval_batch_size: int = 1000
    save: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"trainer.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"trainer.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"trainer.learning_rate {self.learning_rate} must be a positive finite number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"trainer.weight_decay {self.weight_decay} must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"trainer.batch_size {self.batch_size} and eval_batch_size {self.eval_batch_size} must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"trainer.epochs {self.epochs} must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"trainer.label_smoothing {self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.augment_crop <= 8:
            raise ValueError(f"trainer.augment_crop {self.augment_crop} must be in [0..8] pixels (0 = off)")

    def result_settings(self) -> dict:
        """Settings that change an evaluation's result (for the eval key)."""
        d = asdict(self)
        del d["save"], d["eval_batch_size"]
        return d

    def step_settings(self) -> StepSettings:
        """What the compiled train step depends on (epochs, learning rate and schedule are fed at run time)."""
        from fmnas_jax.ops import StepSettings

        return StepSettings(self.optimizer, self.batch_size, self.label_smoothing, self.augment_crop, self.augment_flip)
