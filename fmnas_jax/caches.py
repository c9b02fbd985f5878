"""Files kept between processes: where they live, and how one is written so that a reader sees it whole or not at all.

Standard library only: the data, the store, the compiled pieces and the CLI all keep files here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def cache_home() -> Path:
    """$XDG_CACHE_HOME/fmnas_jax (~/.cache/fmnas_jax by default): JAX's compilation cache and the compiled pieces
    (jax/), decompressed IDX files (idx/), MLflow's empty schema (mlflow-schema/). Any of it may be deleted."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmnas_jax"


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (its folder made) for the block to write; moved onto `path` if the block ends
    without an error, removed if it raises. Readers, and other processes writing the same file, see a whole file or
    none: the move is atomic on one file system."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (see replacing); OSError if the folder cannot be written."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
