"""fmnas_jax: declarative neural architecture search for image-classification CNNs (Fashion-MNIST first) in JAX/Flax.

The light public API (no jax import needed): Genome, SearchSpace, count_params.
"""

from fmnas_jax.genome import Genome, SearchSpace, count_params

__all__ = ["Genome", "SearchSpace", "count_params"]
__version__ = "0.1.0"
