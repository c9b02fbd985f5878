"""Optuna's samplers as a strategy (`search=optuna`, `search.sampler=tpe|nsga2|random`), through ask-and-tell.

Each trial Optuna asks for is one genome: per conv layer its filter count and kernel size as ordered
integers (the index into the space's sorted values: neighbouring values are neighbours for TPE) and its
activation as a category; the head's activation as a category. A genome over the space's size cap is a
FAILED trial and Optuna is asked again. The genome goes to the search like any strategy's (deduplicated
against the store, screened by the rungs, resumed, never retrained); its fitness comes back as the
trial's value (with NSGA-II also its parameter count, minimised). A genome told again from a higher rung
(asynchronous halving) or proposed again after it was evaluated is added as another finished trial with
that value, so the study learns from every result the search has. `known` results (another search's,
stored before this one started) are added to the study first. Needs the `optuna` extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmnas_jax.genome import ConvGene, Genome, SearchSpace, count_params
from fmnas_jax.search.base import ClimbResult, Proposals, SearchConfig, Step, Strategy, best_of

SAMPLERS = ("tpe", "nsga2", "random")
MAX_ASKS = 200  # trials asked in a row for one genome inside the size cap


@dataclass(frozen=True)
class OptunaConfig(SearchConfig):
    """search=optuna: one of Optuna's samplers through ask-and-tell (the optuna extra)."""

    strategy: str = "optuna"
    sampler: str = "tpe"  # tpe | nsga2 | random

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler {self.sampler!r} is not one of {list(SAMPLERS)}")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        return OptunaSearch(
            space, self.seed, self.sampler, {**(given.foreign() if given.foreign else {}), **(given.known or {})}, given.population
        )


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - the message is the test
        raise ImportError("search=optuna needs Optuna: pip install -e '.[optuna]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(space: SearchSpace) -> dict[str, Any]:
    """Optuna distributions of a space's genes (indices into the sorted filters and kernel sizes; categories)."""
    optuna = _import_optuna()
    d: dict[str, Any] = {}
    for i in range(len(space.layout)):
        d[f"layer{i + 1}.filters"] = optuna.distributions.IntDistribution(0, len(space.filters) - 1)
        d[f"layer{i + 1}.kernel"] = optuna.distributions.IntDistribution(0, len(space.kernel_sizes) - 1)
        d[f"layer{i + 1}.activation"] = optuna.distributions.CategoricalDistribution(space.activations)
    d["head.activation"] = optuna.distributions.CategoricalDistribution(space.activations)
    return d


def encode(genome: Genome, space: SearchSpace) -> dict[str, Any]:
    """A genome as the parameters of a trial."""
    params: dict[str, Any] = {"head.activation": genome.head_activation}
    for i, c in enumerate(genome.convs, start=1):
        params |= {f"layer{i}.filters": space.filters.index(c.filters), f"layer{i}.kernel": space.kernel_sizes.index(c.kernel),
                   f"layer{i}.activation": c.activation}  # fmt: skip
    return params


def decode(params: dict[str, Any], space: SearchSpace) -> Genome:
    """The genome of a trial's parameters."""

    def gene(i: int, kind: str) -> ConvGene:
        filters, kernel = space.filters[params[f"layer{i}.filters"]], space.kernel_sizes[params[f"layer{i}.kernel"]]
        return ConvGene(kind, filters, kernel, params[f"layer{i}.activation"])

    convs = tuple(gene(i, kind) for i, kind in enumerate(space.layout, start=1))
    return Genome(convs, params["head.activation"])


def make_sampler(name: str, seed: int) -> Any:
    optuna = _import_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"search.sampler {name!r} is not one of {list(SAMPLERS)}")


class OptunaSearch:
    """An Optuna study as a Strategy (ask/tell); see the module docstring."""

    def __init__(self, space: SearchSpace, seed: int, sampler: str = "tpe", known: dict[Genome, float] | None = None,
                 population: Sequence[Genome] = ()) -> None:  # fmt: skip
        optuna = _import_optuna()
        self.space, self.multi = space, sampler == "nsga2"
        self._optuna, self._dists = optuna, distributions(space)
        directions = ["maximize", "minimize"] if self.multi else ["maximize"]
        self.study = optuna.create_study(directions=directions, sampler=make_sampler(sampler, seed))
        self.scores: dict[Genome, float] = {}
        self.path: list[Step] = []
        self._pending: dict[Genome, list[Any]] = {}
        self._population = list(population)
        self.done = False
        for g, f in (known or {}).items():
            self._add(g, f)

    def _values(self, genome: Genome, fitness: float) -> list[float]:
        return [fitness, float(count_params(genome, self.space.image))] if self.multi else [fitness]

    def _add(self, genome: Genome, fitness: float) -> None:
        if not math.isfinite(fitness):
            return  # a failed evaluation teaches the sampler nothing it can use
        trial = self._optuna.trial.create_trial(params=encode(genome, self.space), distributions=self._dists,
                                                values=self._values(genome, fitness))  # fmt: skip
        self.study.add_trial(trial)

    def ask(self) -> Genome | None:
        if self._population:
            return self._population.pop(0)
        for _ in range(MAX_ASKS):
            trial = self.study.ask(self._dists)
            genome = decode(trial.params, self.space)
            if not self.space.fits(genome):
                self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)  # over the size cap: outside the space
                continue
            if genome in self.scores:  # proposed again: its result is known
                self._finish(trial, genome, self.scores[genome])
                continue
            self._pending.setdefault(genome, []).append(trial)
            return genome
        self.done = True
        return None

    def _finish(self, trial: Any, genome: Genome, fitness: float) -> None:
        if math.isfinite(fitness):
            self.study.tell(trial, self._values(genome, fitness))
        else:
            self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)

    def tell(self, genome: Genome, fitness: float) -> None:
        first = genome not in self.scores
        self.scores[genome] = max(self.scores.get(genome, -math.inf), fitness)
        trials = self._pending.pop(genome, [])
        for trial in trials:
            self._finish(trial, genome, fitness)
        if not trials:
            self._add(genome, fitness)  # the population's, or a higher rung's result: one more finished trial
        if first:
            self.path.append(Step(0, len(self.path), genome, fitness, "sample"))

    def stop(self, why: str) -> None:
        self.done = True

    def result(self) -> ClimbResult:
        return best_of(self.scores, self.path, "the Optuna search")
