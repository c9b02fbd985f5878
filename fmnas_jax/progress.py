"""Progress bars (tqdm, with ETA) for the jobs; nothing below the jobs layer draws one."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from fmnas_jax.budget import TimeBudget
    from fmnas_jax.config import AppConfig
    from fmnas_jax.evaluator import Outcome
    from fmnas_jax.objective import SearchObjective
    from fmnas_jax.store import Store


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


class SearchProgress:
    """The search's progress: a bar of new evaluations (count budget) or of the time budget, with ETA, and the
    search run's metrics at each counted evaluation (step = evaluations counted): `elapsed_seconds` (what a
    resumed attempt charges against the time budget), `evaluations_r<rung>`, and the anytime curve,
    `best_fitness` and `best_val_accuracy` of the top rung so far."""

    def __init__(self, cfg: AppConfig, store: Store, parent: str, budget: TimeBudget) -> None:
        sc, self.budget, self.store, self.parent, self.count = cfg.search, budget, store, parent, 0
        self.rungs: list[SearchObjective] = []  # the search's objectives, cheapest rung first (filled by the job)
        self.per_rung: dict[int, int] = {}
        self.best: dict[str, float] = {}
        planned = sc.population_size + (sc.budget or 0)
        if self.budget.seconds is not None:
            self.bar = count_bar(int(self.budget.seconds), "time budget", "s", cfg.progress)
        else:
            self.bar = count_bar(planned if sc.fidelity.mode == "none" else None, "new evaluations", "eval", cfg.progress)

    def counted(self, rung: int) -> Callable[[Outcome], None]:
        """The callback of rung `rung`'s objective: one counted evaluation arrived."""
        return lambda o: self.tick(rung, o)

    def tick(self, rung: int, o: Outcome) -> None:
        if self.budget.seconds is None:
            self.bar.update()
        else:
            self.bar.update(min(int(self.budget.elapsed()), int(self.budget.seconds)) - self.bar.n)
        self.per_rung[rung] = self.per_rung.get(rung, 0) + 1
        metrics = {f"evaluations_r{rung}": float(self.per_rung[rung])}
        if rung == len(self.rungs) - 1 and o.status == "FINISHED":
            for name, value in (("best_fitness", self.rungs[rung].fitness_of(o)), ("best_val_accuracy", o.metric("val_accuracy"))):
                if math.isfinite(value) and value > self.best.get(name, -math.inf):
                    self.best[name] = value
        self.log_elapsed(metrics | self.best)

    def log_elapsed(self, metrics: dict[str, float] | None = None, step_on: bool = True) -> None:
        """`elapsed_seconds` (and `metrics`) at the next step, or with `step_on` False at the last evaluation's step:
        the retrain's epochs keep the time charged up to date without adding steps (one meaning per axis)."""
        self.count += step_on
        self.store.log(self.parent, metrics={"elapsed_seconds": self.budget.elapsed()} | (metrics or {}), step=self.count)

    def close(self) -> None:
        self.bar.close()
