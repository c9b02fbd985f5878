"""Search strategies: population sampling, hill climbing in genome space, the paper's table climber, and the baselines."""

from fmnas_jax.search.base import (
    STRATEGY_CONFIGS,
    ClimbResult,
    EvolutionConfig,
    FidelityConfig,
    HillClimbConfig,
    Objective,
    OptunaConfig,
    RandomConfig,
    Rung,
    SearchConfig,
    Step,
    TableConfig,
)
from fmnas_jax.search.evolution import regularized_evolution
from fmnas_jax.search.fitness import FitnessConfig, fitness, pareto_front
from fmnas_jax.search.hillclimb import hill_climb
from fmnas_jax.search.random_search import random_search
from fmnas_jax.search.table import table_climb

__all__ = [
    "STRATEGY_CONFIGS",
    "ClimbResult",
    "EvolutionConfig",
    "FidelityConfig",
    "FitnessConfig",
    "HillClimbConfig",
    "Objective",
    "OptunaConfig",
    "RandomConfig",
    "Rung",
    "SearchConfig",
    "Step",
    "TableConfig",
    "fitness",
    "hill_climb",
    "pareto_front",
    "random_search",
    "regularized_evolution",
    "table_climb",
]
