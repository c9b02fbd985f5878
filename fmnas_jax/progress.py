"""Progress bars (tqdm, with ETA) for the jobs; nothing below the jobs layer draws one."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from tqdm import tqdm


class EpochBar:
    """Epochs of the evaluation training in this process, with the latest validation accuracy."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs, self.enabled = epochs, enabled
        self._bar: tqdm | None = None

    def update(self, genome: Any, epoch: int, row: dict[str, float]) -> None:
        if self._bar is None or epoch <= self._bar.n:  # a new evaluation starts (or resumes from a checkpoint)
            self.close()
            # The bar starts at the first reported epoch, so its rate and ETA count epochs after it
            # (tqdm's `initial`); starting at 0 would time the first epoch as instantaneous.
            self._bar = tqdm(total=self.epochs, initial=epoch, desc="  epochs", leave=False, disable=not self.enabled, unit="ep")
        else:
            self._bar.update(epoch - self._bar.n)
        if "epochs_planned" in row and int(row["epochs_planned"]) != self._bar.total:  # a deadline re-planned the training
            self._bar.total = int(row["epochs_planned"])
            self._bar.refresh()
        self._bar.set_postfix(val_acc=f"{row['val_accuracy']:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def count_bar(total: int | None, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar over a count of things (new evaluations, seconds of budget), with ETA."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
