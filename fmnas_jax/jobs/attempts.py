"""What earlier attempts of a search left in the store: its own runs, the time they spent, the retrain they finished.

A search is identified by its search_key; every run with that key (this attempt, earlier ones, a twin started on
another machine) is one of its own, and what they evaluated counts against its budget even when reused, so that
every attempt retraces the same path.
"""

from __future__ import annotations

import math

from fmnas_jax.genome import Genome
from fmnas_jax.store import Store


class OwnSearches:
    """The search runs of one search_key: this one, its earlier attempts, and twins started meanwhile (another machine).

    Evaluations whose parent is one of them count against this search's budget even when reused, so
    that every attempt, and every machine running the same search, retraces the same path.
    """

    def __init__(self, store: Store, key: str, known: set[str]) -> None:
        self.store, self.key, self.known, self.others = store, key, set(known), set()

    def __contains__(self, run_id: object) -> bool:
        if not isinstance(run_id, str) or run_id in self.others:
            return False
        if run_id not in self.known:
            record = self.store.get_run(run_id)
            if record.role != "search" or record.tags.get("search_key") != self.key:
                self.others.add(run_id)
                return False
            self.known.add(run_id)
        return True


def earlier_attempts(store: Store, own: OwnSearches, parent: str) -> tuple[float, bool]:
    """(seconds the earlier attempts of this search spent, whether one of them finished)."""
    spent, finished = 0.0, False
    for run_id in sorted(own.known - {parent}):
        record = store.get_run(run_id)
        spent += max(record.metric("elapsed_seconds"), 0.0) if math.isfinite(record.metric("elapsed_seconds")) else 0.0
        finished |= record.status == "FINISHED"
    return spent, finished


def earlier_final_epochs(store: Store, own: OwnSearches, genome: Genome) -> int | None:
    """The epochs of this winner's final retrain by an earlier attempt of this search, if one finished."""
    for record in store.finished_runs("final", str(genome)):
        if record.parent_run_id in own:
            return record.int_param("trainer.epochs")
    return None
