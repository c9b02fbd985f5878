"""Use a trained model: load it from an MLflow run or a checkpoint file, predict, and explain per class.

from fmnas_jax.inference import load_run
model = load_run("<run id>", tracking_uri="sqlite:///mlflow.db")
predict = model.predict_fn()          # (N, 28, 28, 1) uint8 or float -> (N,) class ids
"""

from __future__ import annotations

import functools
import gzip
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnas_jax.checkpoint import read_checkpoint
from fmnas_jax.data import CLASS_NAMES, Normalisation, decode_idx
from fmnas_jax.genome import FASHION_MNIST, Genome, ImageShape
from fmnas_jax.store import CHECKPOINT, Store, StoreError


@dataclass(frozen=True)
class TrainedModel:
    """A genome with trained variables and the normalisation its inputs need."""

    genome: Genome
    variables: dict
    normalisation: Normalisation  # (mean, std) per channel
    image: ImageShape = FASHION_MNIST  # the data it was trained on
    class_names: tuple[str, ...] = CLASS_NAMES

    def predict_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from images (N, height, width[, channels]) on the 0..255 scale to class ids (N,); jitted inside."""
        return lambda images: predict_classes(self.genome, self.variables, self.normalisation, as_images(images, self.image))


def load_checkpoint(path: str | Path) -> TrainedModel:
    """A model from a checkpoint file written by fmnas_jax (msgpack; never pickle)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    return TrainedModel(*read_checkpoint(p.read_bytes()))


def load_run(run_id: str, tracking_uri: str | None = None, experiment: str = "fmnas_jax", store: Store | None = None) -> TrainedModel:
    """A model from the weights an MLflow run saved (trainer.save=true, and every retrained winner)."""
    store = store or Store(tracking_uri, experiment)
    artifact = store.get_run(run_id).checkpoint
    if not artifact:
        raise StoreError(f"run {run_id} has no saved weights (no {CHECKPOINT} tag); train with trainer.save=true")
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(store.download_checkpoint(run_id, artifact, tmp))


def as_images(x: np.ndarray, image: ImageShape = FASHION_MNIST) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) in the model's data shape -> (N, H, W, C); ValueError for anything else."""
    x = np.asarray(x)
    if x.ndim == 3 and image.channels == 1:
        x = x[..., None]
    want = (image.height, image.width, image.channels)
    if x.ndim != 4 or x.shape[1:] != want:
        grey = f"(N, {image.height}, {image.width}) or " if image.channels == 1 else ""
        raise ValueError(f"images must have shape {grey}(N, {', '.join(map(str, want))}), got {x.shape}")
    return x


def read_images(path: str | Path, image: ImageShape = FASHION_MNIST) -> np.ndarray:
    """Images from a .npy array or an IDX file (raw or .gz), as (N, H, W, C) of the model's data shape."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"images file {str(p)!r} does not exist")
    if p.suffix == ".npy":
        return as_images(np.load(p, allow_pickle=False), image)
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return as_images(decode_idx(raw, str(p), images=True)[..., None], image)


@functools.lru_cache(maxsize=16)
def _predict_fn(genome: Genome, classes: int) -> Callable:
    import jax

    from fmnas_jax.model import GenomeCNN
    from fmnas_jax.train import normalise

    model = GenomeCNN(genome, classes)
    return jax.jit(lambda variables, x, norm: model.apply(variables, normalise(x, norm), train=False).argmax(-1))


def predict_classes(genome: Genome, variables: dict, normalisation: Normalisation, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class ids (N,) for images (N, H, W, C) given as uint8 0..255 (or floats on that scale)."""
    import jax.numpy as jnp

    x = np.asarray(images)
    n = len(x)
    pad = -n % batch
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    norm, fn = jnp.asarray(normalisation, jnp.float32), _predict_fn(genome, int(np.shape(variables["params"]["Dense_1"]["bias"])[0]))
    out = [fn(variables, jnp.asarray(x[i : i + batch]), norm) for i in range(0, len(x), batch)]  # (batch,) each
    return np.concatenate([np.asarray(o) for o in out])[:n].astype(np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """(classes, classes) counts: rows true class, columns predicted."""
    cm = np.zeros((classes, classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_markdown(cm: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES) -> str:
    """Per-class accuracy table with the data's class names (Fashion-MNIST's by default)."""
    lines = ["| class | name | test images | correct | accuracy |", "|---|---|---|---|---|"]
    for c, name in enumerate(class_names):
        total = int(cm[c].sum())
        acc = cm[c, c] / total if total else float("nan")
        lines.append(f"| {c} | {name} | {total} | {int(cm[c, c])} | {100 * acc:.2f}% |")
    lines.append(f"| all | | {int(cm.sum())} | {int(np.trace(cm))} | {100 * np.trace(cm) / max(cm.sum(), 1):.2f}% |")
    return "\n".join(lines) + "\n"
