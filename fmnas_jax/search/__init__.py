"""Search strategies: population sampling, hill climbing in genome space, the paper's table climber, and the baselines.

Each strategy's module holds the strategy and its settings class (a `SearchConfig` subclass); `STRATEGY_CONFIGS` is
the registry the config layer and the CLI read (conf/search/<name>.yaml composes against the class registered here).
"""

from fmnas_jax.search.base import STRATEGIES, ClimbResult, FidelityConfig, Objective, Rung, SearchConfig, Step
from fmnas_jax.search.evolution import EvolutionConfig, regularized_evolution
from fmnas_jax.search.fitness import FitnessConfig, fitness, pareto_front
from fmnas_jax.search.hillclimb import HillClimbConfig, hill_climb
from fmnas_jax.search.optuna_search import OptunaConfig
from fmnas_jax.search.random_search import RandomConfig, random_search
from fmnas_jax.search.table import TableConfig, table_climb

STRATEGY_CONFIGS: dict[str, type[SearchConfig]] = {
    "hillclimb": HillClimbConfig,
    "table": TableConfig,
    "random": RandomConfig,
    "evolution": EvolutionConfig,
    "optuna": OptunaConfig,
}
assert tuple(STRATEGY_CONFIGS) == STRATEGIES

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
