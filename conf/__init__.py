"""fmnas_jax's Hydra configs (installed as fmnas_jax.conf).

Importing the package registers the typed schemas its files compose against (fmnas_jax.cli.register_schemas), so
Hydra's compose API works on it directly: `initialize_config_module("fmnas_jax.conf")`.
"""

from fmnas_jax.cli import register_schemas

register_schemas()
