"""`python -m fmnas_jax ...`: see fmnas_jax/cli.py and README.md."""

from fmnas_jax.cli import entry

if __name__ == "__main__":
    entry()
