"""The search's wall-clock budget (`search.time_budget`), across its attempts: the one owner of the job's clock.

A budget starts when the job starts (start-up excluded); what earlier attempts of the same search spent is charged
to it (a resumed search finishes within the original budget); the winner's retrain trains the epochs that fit what
is left and is held to the budget's end by the trainer. The clock is injectable, so the rules are tested without
waiting for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Measured on the 2-core AMD EPYC (main job, 2026-11-28): the retrain's epochs ran ~5 % slower than the
# cost model predicted (each also validates), and the per-class report, the figures and the MLflow Model's
# logging and registration took ~30 s after the last epoch; with neither margin the job overran by ~60 s.
RETRAIN_EPOCH_MARGIN = 1.05
AFTER_RETRAIN_SECONDS = 30.0


@dataclass
class TimeBudget:
    """`seconds` of wall clock (None: untimed) for one search and its retrain, from `started` on `clock`."""

    seconds: float | None
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=math.nan)
    spent_before: float = 0.0  # what earlier attempts of this search spent (charge())

    def __post_init__(self) -> None:
        if math.isnan(self.started):
            self.started = self.clock()

    @property
    def timed(self) -> bool:
        return self.seconds is not None

    def charge(self, seconds: float) -> None:
        """Charge what earlier attempts of this search spent."""
        self.spent_before += seconds

    def elapsed(self) -> float:
        """Seconds this attempt has run (what a later attempt is charged)."""
        return self.clock() - self.started

    def end(self) -> float | None:
        """When the budget ends, on `clock` (None when untimed)."""
        return None if self.seconds is None else self.started + self.seconds - self.spent_before

    def left(self) -> float:
        """Seconds left (inf when untimed)."""
        end = self.end()
        return math.inf if end is None else end - self.clock()

    def retrain_cap(self, share: float) -> float:
        """The most of the budget the search keeps back for the winner's retrain (0 when untimed)."""
        return share * (self.seconds or 0.0)

    def retrain_deadline(self) -> float | None:
        """When the retrain's last epoch must end (on `clock`): the budget's end, less the report after it."""
        end = self.end()
        return None if end is None else end - AFTER_RETRAIN_SECONDS

    def retrain_epochs(self, planned: int, epoch_seconds: float, overhead: float, speedup: float = 1.0) -> int:
        """How many of `planned` epochs fit what is left (at least one): each predicted `epoch_seconds` (plus a margin),
        after `overhead` seconds of compiling and data loading, `speedup` times faster than one worker predicted."""
        if self.seconds is None:
            return planned
        seconds = (self.left() - AFTER_RETRAIN_SECONDS) * speedup - overhead
        fit = int(seconds // max(RETRAIN_EPOCH_MARGIN * epoch_seconds, 1e-9))
        return max(1, min(planned, fit))
