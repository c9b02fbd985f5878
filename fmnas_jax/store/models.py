"""A run's weights as an MLflow 3 logged model (models from code), and its registration."""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fmnas_jax.store.connection import DUPLICATE_ROW, _first_line
from fmnas_jax.store.names import CHECKPOINT, IMAGE, LOGGED_MODEL, MODEL, MODEL_CHECKPOINT, REGISTERED
from fmnas_jax.store.records import ArtifactError

log = logging.getLogger("fmnas_jax.store")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name,
            description="CNNs found by fmnas_jax: input (N, height, width[, channels]) uint8 pixels of the data it was "
            "trained on (the version's signature), output class ids",
        )
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise


CHAMPION = "champion"  # the registered model's alias: its best version by validation accuracy
_CROWN_ROUNDS = 20  # read-compare-set rounds before crown_if_best leaves the alias to the next registration


def _val_accuracy(version: object) -> float:
    """A version's validation accuracy (its tag); -inf if missing or unreadable, so it never wins."""
    try:
        value = float(version.tags.get("val_accuracy", "nan"))  # type: ignore[attr-defined]
    except ValueError:
        return float("-inf")
    return float("-inf") if math.isnan(value) else value


def _is_conflict(error: Exception) -> bool:
    """Another process created the same alias row at the same moment (SQLite's and PostgreSQL's wording)."""
    text = str(error).lower()
    return any(t in text for t in DUPLICATE_ROW) or "integrityerror" in text


def crown_if_best(client: MlflowClient, name: str, version: str) -> bool:
    """Point the alias `champion` at the registered version with the highest validation accuracy (version tag);
    True if that is `version`. Ties keep the earlier version; test accuracy stays a reported number, never the choice.

    Safe when several searches register at once (a Hydra multirun on one store): each compares all versions,
    not just its own against the alias it read, and reads again after setting, so a worse version written late
    by another process is overwritten and the last registration leaves the best; two processes creating the
    alias at the same moment (a unique-constraint error from the database) read again instead of failing."""
    for _ in range(_CROWN_ROUNDS):
        versions = client.search_model_versions(f"name = '{name}'")
        best = str(max(versions, key=lambda v: (_val_accuracy(v), -int(v.version))).version)
        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            current = None  # no champion yet
        if current == best:
            return best == str(version)
        try:
            client.set_registered_model_alias(name, CHAMPION, best)
        except MlflowException as e:
            if not _is_conflict(e):
                raise
            log.debug("alias %s of %s set by another process at the same moment; reading again", CHAMPION, name)
    log.warning("the alias %s of %s kept moving under concurrent registrations; left as the last one set it", CHAMPION, name)
    return False


def _model_requirements() -> list[str]:
    """What the model needs beyond its code (fmnas_jax travels inside it): the installed versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("jax", "jaxlib", "flax", "optax", "numpy", "mlflow")]


class _Models:
    """The Store's models methods (see fmnas_jax.store.Store)."""

    def log_model(self, run_id: str, checkpoint: bytes, register_as: str | None, tags: dict[str, str],
                  input_shape: tuple[int, ...] = (IMAGE, IMAGE)) -> str | None:  # fmt: skip
        """Store the run's weights as a logged model named `model` (MLflow 3: listed in the experiment's Models
        tab and the run's Logged models; models from code, nothing pickled), the weights' only copy: the run's
        checkpoint tag points at them inside it. If `register_as` is set, register it as a new version with
        `tags`; returns the version. `input_shape`: one image's (height, width[, channels]), the signature's input."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        import fmnas_jax

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *input_shape))]),  # unnamed: one array in, one out
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        )
        package = Path(fmnas_jax.__file__).parent  # the model's code: models from code, fmnas_jax inside
        model_tags = {k: v for k, v in tags.items() if k != "run_id"}
        model = self._retry(lambda: self.client.create_logged_model(self.experiment_id, name=LOGGED_MODEL, source_run_id=run_id,
                                                                    tags=model_tags, model_type="fmnas-cnn"),
                            "creating the logged model")  # fmt: skip
        try:
            self._upload_model(model, run_id, checkpoint, signature, package, input_shape)
        except ArtifactError:
            try:  # no PENDING model left behind
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            except MlflowException as e:
                log.warning("could not mark logged model %s FAILED: %s", model.model_id, _first_line(e))
            raise
        self._retry(lambda: self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY), "finalizing the model")
        self._retry(lambda: self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)]), "linking the model")
        self.log(run_id, tags={MODEL: f"models:/{model.model_id}", CHECKPOINT: f"models:/{model.model_id}/{MODEL_CHECKPOINT}"})
        if not register_as:
            return None
        self._retry(lambda: _ensure_registered_model(self.client, register_as), "creating the registered model")
        version = self._retry(
            # source: the logged model's own location (MLflow's registry would resolve models:/<id> against the
            # process-wide tracking URI, not this store's)
            lambda: self.client.create_model_version(register_as, model.artifact_location, run_id=run_id, tags=tags,
                                                     description=tags.get("genome"), model_id=model.model_id),
            "registering the model",
        )  # fmt: skip
        self.log(run_id, tags={REGISTERED: f"{register_as}/{version.version}"})
        crowned = self._retry(lambda: crown_if_best(self.client, register_as, str(version.version)), "setting the champion alias")
        best = f"; the best by validation accuracy, models:/{register_as}@{CHAMPION}" * crowned
        log.info("registered the model of run %s as %s version %s (models:/%s/%s)%s", run_id, register_as, version.version,
                 register_as, version.version, best)  # fmt: skip
        return str(version.version)

    def _upload_model(self, model: object, run_id: str, checkpoint: bytes, signature: object, package: Path,
                      input_shape: tuple[int, ...]) -> None:  # fmt: skip
        """Write the MLflow Model (its MLmodel naming the logged model) and upload it into the logged model."""
        import mlflow.pyfunc
        from mlflow.models import Model

        model_id, location = model.model_id, model.artifact_location  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "checkpoint.msgpack"
            weights.write_bytes(checkpoint)
            path = Path(tmp) / "model"
            meta = Model(artifact_path=location, model_uuid=model_id, run_id=run_id, model_id=model_id)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")  # the signature validates
                try:
                    mlflow.pyfunc.save_model(
                        path, python_model=str(package / "pyfunc_model.py"), artifacts={"checkpoint": str(weights)},
                        code_paths=[str(package)], signature=signature, mlflow_model=meta,
                        input_example=np.zeros((2, *input_shape), np.uint8), pip_requirements=_model_requirements(),
                    )  # fmt: skip
                except OSError as e:
                    raise ArtifactError(f"could not write the MLflow Model of run {run_id}: {_first_line(e)}", run_id) from e
            with self._artifact_errors(run_id, f"models:/{model_id}"):
                self._retry(lambda: self.client.log_model_artifacts(model_id, str(path)), "storing the model")

    def download_checkpoint(self, run_id: str, checkpoint: str, dst: str) -> str:
        """The local path of a run's weights: `checkpoint` (its tag) inside its logged model, or, for runs
        logged before logged models, an artifact of the run itself."""
        if not checkpoint.startswith("models:/"):
            return self.download(run_id, checkpoint, dst)
        model_id, _, inside = checkpoint.removeprefix("models:/").partition("/")
        import mlflow.artifacts

        location = self._retry(lambda: self.client.get_logged_model(model_id).artifact_location, "reading the logged model")
        return self._retry(
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/{inside}", dst_path=dst,
                                                         tracking_uri=self.uri),
            "downloading the weights",
        )  # fmt: skip
