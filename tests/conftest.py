"""Shared fixtures. Tests run on CPU; the real dataset is used where a test says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"


def pytest_configure(config: pytest.Config) -> None:
    if not REAL_DATA.is_dir():
        # CI installs dataset-fashion-mnist; a machine without it skips the real-data tests loudly.
        config.issue_config_time_warning(pytest.PytestWarning(f"{REAL_DATA} missing: real-data tests will be skipped"), 2)


needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="install dataset-fashion-mnist (apt) for real-data tests")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
