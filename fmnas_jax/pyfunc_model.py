"""A trained genome as an MLflow Model, logged as code (MLflow's "models from code": nothing pickled).

MLflow runs this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models serve`);
the package never imports it. The weights are the run's msgpack checkpoint, an artifact of the model.

Input: a (N, height, width[, channels]) uint8 array of pixel values 0..255 in the shape of the data it was trained
on ((N, 28, 28) for Fashion-MNIST; JSON numbers when served). Output: (N,) class ids (the checkpoint names them).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class GenomeClassifier(PythonModel):
    """Classifies images with the genome and weights of the checkpoint artifact (it names the data's shape and classes)."""

    # The model's signature (a uint8 tensor) validates inputs: MLflow's type-hint validation, and its warning asking
    # for type hints at every load, do not apply (the attribute MLflow's own ChatModel sets to skip them).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from fmnas_jax.inference import load_checkpoint

        self.model = load_checkpoint(context.artifacts["checkpoint"])
        self.predict_classes = self.model.predict_fn()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as an input schema
        """(N, height, width[, channels]) uint8 pixel values -> (N,) int64 class ids."""
        return self.predict_classes(np.asarray(model_input))


mlflow.models.set_model(GenomeClassifier())
