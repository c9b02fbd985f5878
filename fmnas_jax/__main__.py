"""`python -m fmnas_jax ...` and the `fmnas-jax` script: see fmnas_jax/cli.py and README.md."""

import sys

from fmnas_jax.startup import restart_with_huge_pages


def entry() -> None:
    """Restart with glibc's huge pages first (before jax, mlflow and Hydra are imported), then the command line."""
    restart_with_huge_pages()
    from fmnas_jax.cli import main, quote_values

    sys.argv = quote_values(sys.argv)
    main()


if __name__ == "__main__":
    entry()
