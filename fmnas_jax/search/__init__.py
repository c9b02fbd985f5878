"""Search strategies: population sampling, hill climbing in genome space, and the paper's table climber."""

from fmnas_jax.search.base import ClimbResult, Objective, SearchConfig, Step
from fmnas_jax.search.fitness import FitnessConfig, fitness, pareto_front
from fmnas_jax.search.hillclimb import hill_climb
from fmnas_jax.search.table import table_climb

__all__ = ["ClimbResult", "FitnessConfig", "Objective", "SearchConfig", "Step", "fitness", "hill_climb", "pareto_front", "table_climb"]
