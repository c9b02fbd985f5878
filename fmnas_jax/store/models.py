"""A run's weights as a checkpoint artifact and as an MLflow Model (models from code), and its registration."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fmnas_jax.store.connection import _first_line
from fmnas_jax.store.names import CHECKPOINT, IMAGE, MODEL, MODEL_ARTIFACT, REGISTERED
from fmnas_jax.store.records import ArtifactError

log = logging.getLogger("fmnas_jax.store")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description="Fashion-MNIST CNNs found by fmnas_jax: input (N, 28, 28) uint8 pixels, output class ids 0-9."
        )
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise


CHAMPION = "champion"  # the registered model's alias: its best version by validation accuracy


def crown_if_best(client: MlflowClient, name: str, version: str) -> bool:
    """Point the alias `champion` at `version` if its validation accuracy (version tag) beats the current
    champion's, or there is none yet; True if it moved. Test accuracy stays a reported number, never the choice."""

    def val(v: object) -> float:
        try:
            return float(v.tags.get("val_accuracy", "nan"))  # type: ignore[attr-defined]
        except ValueError:
            return float("nan")

    new = client.get_model_version(name, version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None  # no champion yet
    if current is not None and not val(new) > val(current):
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def _model_requirements() -> list[str]:
    """What the model needs beyond its code (fmnas_jax travels inside it): the installed versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("jax", "jaxlib", "flax", "optax", "numpy", "mlflow")]


class _Models:
    """The Store's models methods (see fmnas_jax.store.Store)."""

    def save_checkpoint(self, run_id: str, blob: bytes, artifact: str) -> None:
        """Store the weights as artifact `artifact` of the run and point the checkpoint tag at it."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact).name
            path.write_bytes(blob)
            self.log_file(run_id, path, str(Path(artifact).parent))
        self.log(run_id, tags={CHECKPOINT: artifact})

    def log_model(self, run_id: str, checkpoint: bytes, register_as: str | None, tags: dict[str, str]) -> str | None:
        """Log the run's weights as an MLflow Model (artifact `mlflow_model`: models from code, nothing pickled)
        and, if `register_as` is set, register it as a new version with `tags`; returns the version."""
        import mlflow.pyfunc
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        import fmnas_jax

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE, IMAGE))]),  # unnamed: one array in, one out
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        )
        package = Path(fmnas_jax.__file__).parent  # the model's code: models from code, fmnas_jax inside
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "checkpoint.msgpack"
            weights.write_bytes(checkpoint)
            path = Path(tmp) / MODEL_ARTIFACT
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")  # the signature validates
                try:
                    mlflow.pyfunc.save_model(
                        path, python_model=str(package / "pyfunc_model.py"), artifacts={"checkpoint": str(weights)},
                        code_paths=[str(package)], signature=signature,
                        input_example=np.zeros((2, IMAGE, IMAGE), np.uint8), pip_requirements=_model_requirements(),
                    )  # fmt: skip
                except OSError as e:
                    raise ArtifactError(f"could not write the MLflow Model of run {run_id}: {_first_line(e)}", run_id) from e
            with self._artifact_errors(run_id, MODEL_ARTIFACT):
                self._retry(lambda: self.client.log_artifacts(run_id, str(path), MODEL_ARTIFACT), "storing the model")
        self.log(run_id, tags={MODEL: MODEL_ARTIFACT})
        if not register_as:
            return None
        self._retry(lambda: _ensure_registered_model(self.client, register_as), "creating the registered model")
        version = self._retry(
            lambda: self.client.create_model_version(register_as, f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags,
                                                     description=tags.get("genome")),
            "registering the model",
        )  # fmt: skip
        self.log(run_id, tags={REGISTERED: f"{register_as}/{version.version}"})
        crowned = self._retry(lambda: crown_if_best(self.client, register_as, str(version.version)), "setting the champion alias")
        best = f"; the best by validation accuracy, models:/{register_as}@{CHAMPION}" * crowned
        log.info("registered the model of run %s as %s version %s (models:/%s/%s)%s", run_id, register_as, version.version,
                 register_as, version.version, best)  # fmt: skip
        return str(version.version)
