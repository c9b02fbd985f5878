"""Fashion-MNIST: loading, integrity checks, and seeded stratified splits.

Arrays stay uint8 images (N, 28, 28, 1) and int32 labels; the trainer normalises on
the device with the training split's mean and std, which travel with the Dataset.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# sha256 of the decompressed IDX files (header included); Debian's .gz differ from the
# originals only in their gzip headers, so checking the decoded bytes covers both.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SOURCES = ("auto", "idx", "tfds")
HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}), point data.dir at a folder holding the four original IDX files "
    "(train-images-idx3-ubyte[.gz], ...), or use data.source=tfds on a machine with internet."
)


class DataError(RuntimeError):
    """The dataset is missing, truncated or corrupt."""


TRAIN_IMAGES = 60_000  # Fashion-MNIST's training images, the validation split carved from them


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split."""

    source: str = "auto"
    dir: str = DEBIAN_DIR
    val_size: int = 5000
    train_size: int | None = None
    verify: bool = True
    tfds_dir: str | None = None  # data.source=tfds: TFDS's data_dir (null = its default, $TFDS_DATA_DIR or ~/tensorflow_datasets)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source {self.source!r} is not one of {list(SOURCES)}")
        if self.val_size < 10 or self.val_size > 30000:
            raise ValueError(f"data.val_size {self.val_size} must be in [10..30000] (a multiple of 10 keeps it stratified)")
        if self.train_size is not None and not 10 <= self.train_size <= TRAIN_IMAGES - self.val_size:
            raise ValueError(f"data.train_size {self.train_size} must be null or in [10..{TRAIN_IMAGES - self.val_size}]")

    @property
    def n_train(self) -> int:
        """Training images this config gives: train_size, or the rest of the 60,000 after validation."""
        return self.train_size if self.train_size is not None else TRAIN_IMAGES - self.val_size

    def result_settings(self) -> dict:
        """Settings that change an evaluation's result (for the eval key)."""
        return {"val_size": self.val_size, "train_size": self.train_size}


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test splits plus the normalisation taken from the train split."""

    x_train: np.ndarray  # (N, 28, 28, 1) uint8
    y_train: np.ndarray  # (N,) int32
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float
    source: str

    def summary(self) -> str:
        return (
            f"{self.source}: train {len(self.y_train)}, val {len(self.y_val)}, test {len(self.y_test)} "
            f"(mean {self.mean:.4f}, std {self.std:.4f})"
        )


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def _read_idx_bytes(folder: Path, stem: str) -> bytes:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.exists():
            try:
                return gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError) as e:
                raise DataError(f"{path} is truncated or corrupt ({e}). {HOW_TO_GET}") from e
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}. {HOW_TO_GET}")


def decode_idx(raw: bytes, name: str, images: bool) -> np.ndarray:
    """Decoded IDX bytes: (N, 28, 28) uint8 images or (N,) labels; ValueError names what is wrong."""
    header = 16 if images else 8
    magic = 2051 if images else 2049
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{name} is not an IDX {'image' if images else 'label'} file (magic {magic} expected)")
    n = int.from_bytes(raw[4:8], "big")
    if images and (int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")) != (28, 28):
        raise ValueError(f"{name} holds images of another size than 28x28")
    shape = (n, 28, 28) if images else (n,)
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{name} has {len(raw)} bytes, expected {expected}: truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx_dir(folder: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, ...]:
    """Read the four IDX files: (x_train, y_train, x_test, y_test), images (N, 28, 28, 1)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.dir {str(folder)!r} does not exist. {HOW_TO_GET}")
    arrays = []
    for stem, digest in SHA256.items():
        raw = _read_idx_bytes(folder, stem)
        if verify and hashlib.sha256(raw).hexdigest() != digest:
            raise DataError(f"{stem} in {folder} fails its sha256 check (corrupt or not Fashion-MNIST). {HOW_TO_GET}")
        try:
            arrays.append(decode_idx(raw, stem, images="images" in stem))
        except ValueError as e:
            raise DataError(f"{e}. {HOW_TO_GET}") from e
    x_train, y_train, x_test, y_test = arrays
    return x_train[..., None], y_train.astype(np.int32), x_test[..., None], y_test.astype(np.int32)


def tfds_file_order(split: str, n: int) -> np.ndarray:
    """Which example of the original files each stored record of a TFDS split is.

    TFDS's FashionMNIST builder keys example i of the IDX files by i, and its writer stores the records
    sorted by md5(split name + str(key)) (tensorflow_datasets.core.shuffle / hashing). Undoing that
    gives the files' order back, so both sources yield the same arrays and a seeded split picks the same
    images; the sha256 check of load_tfds confirms it.
    """
    salt = hashlib.md5(split.encode())

    def stored_at(i: int) -> bytes:
        h = salt.copy()
        h.update(str(i).encode())
        return h.digest()

    return np.array(sorted(range(n), key=stored_at))


def _idx_sha256(array: np.ndarray, images: bool) -> str:
    """The sha256 of the decoded IDX file these images (N, 28, 28) or labels (N,) would be."""
    header = (2051 if images else 2049).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return hashlib.sha256(header + np.ascontiguousarray(array, np.uint8).tobytes()).hexdigest()


def load_tfds(data_dir: str | None = None, verify: bool = True) -> tuple[np.ndarray, ...]:
    """Fashion-MNIST through tensorflow-datasets' `fashion_mnist` (a prepared `data_dir`, or TFDS downloads it),
    in the IDX files' order and, with `verify`, checked against their sha256."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"data.source=tfds needs tensorflow-datasets (pip install 'fmnas_jax[tfds]'). {HOW_TO_GET}") from e
    out: list[np.ndarray] = []
    for split, stem in (("train", "train"), ("test", "t10k")):
        where = data_dir or "TFDS's default data_dir"
        try:
            ds = tfds.data_source("fashion_mnist", split=split, data_dir=data_dir)
            examples = ds.__getitems__(list(range(len(ds))))  # one batched read and decode
        except Exception as e:
            raise DataError(f"tensorflow-datasets could not read fashion_mnist/{split} from {where}: {e}. {HOW_TO_GET}") from e
        stored_x = np.stack([np.asarray(ex["image"], np.uint8).reshape(28, 28) for ex in examples])
        stored_y = np.asarray([ex["label"] for ex in examples], np.uint8)
        x, y = np.empty_like(stored_x), np.empty_like(stored_y)
        order = tfds_file_order(split, len(stored_y))
        x[order], y[order] = stored_x, stored_y
        if verify:
            for array, kind in ((x, "images"), (y, "labels")):
                name = f"{stem}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
                if _idx_sha256(array, kind == "images") != SHA256[name]:
                    raise DataError(f"tensorflow-datasets' fashion_mnist/{split} in {where} does not match Fashion-MNIST's "
                                    f"{name} (sha256): another dataset, or written in another order. {HOW_TO_GET}")  # fmt: skip
        out += [x[..., None], y.astype(np.int32)]
    return tuple(out)


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def stratified_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices with each class in proportion to `labels` (sorted)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * size).astype(int)
    for i in np.argsort(-(counts / counts.sum() * size - quota))[: size - quota.sum()]:
        quota[i] += 1  # hand out the rounding remainder, largest fractions first
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picks))


def split(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, cfg: DataConfig, seed: int, source: str) -> Dataset:
    """Carve a stratified validation split (and optional train subset) from the training set."""
    rng = np.random.default_rng([seed, 0xDA7A])
    val_idx = stratified_indices(y, cfg.val_size, rng)
    rest = np.setdiff1d(np.arange(len(y)), val_idx)
    if cfg.train_size is not None:
        rest = rest[stratified_indices(y[rest], cfg.train_size, rng)]
    x_train = x[rest]
    mean = float(x_train.mean() / 255.0)
    std = float(x_train.std() / 255.0)
    return Dataset(x_train, y[rest], x[val_idx], y[val_idx], x_test, y_test, mean, std, source)


@functools.lru_cache(maxsize=2)
def _reads_idx(source: str, folder: str) -> bool:
    """Whether data.source reads the IDX folder (idx, or auto with the folder present) rather than tfds."""
    return source == "idx" or (source == "auto" and Path(folder).is_dir())


@functools.lru_cache(maxsize=2)
def load_arrays(source: str, folder: str, verify: bool, tfds_dir: str | None = None) -> tuple[tuple[np.ndarray, ...], str]:
    """Raw (x_train, y_train, x_test, y_test) in the IDX files' order and a description of where they came from.

    Read and checked once per process (a job checks the data before it opens the store, then trains and
    reports from it): the arrays are shared, read-only."""
    if _reads_idx(source, folder):
        return _read_only(load_idx_dir(folder, verify)), f"idx:{folder}"
    if source == "tfds":
        return _read_only(load_tfds(tfds_dir, verify)), "tfds:fashion_mnist"
    raise DataError(f"data.dir {folder!r} does not exist and data.source=auto found no other source. {HOW_TO_GET}")


def _read_only(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@dataclass(frozen=True)
class SplitRecord:
    """What one split an evaluation used is, for the results store (MLflow's dataset inputs)."""

    name: str  # fashion_mnist/train, fashion_mnist/validation, fashion_mnist/test
    context: str  # training | validation | testing
    digest: str  # 16 hex digits: the files' sha256, the split's settings and the seed
    source: str  # the IDX folder, or tfds:fashion_mnist
    source_type: str  # local | tfds
    rows: int


def split_records(cfg: DataConfig, seed: int, test: bool = True) -> list[SplitRecord]:
    """The train/validation(/test) splits an evaluation with these settings uses (no data is read)."""
    files = ",".join(SHA256.values())
    source, source_type = (str(Path(cfg.dir).resolve()), "local") if _reads_idx(cfg.source, cfg.dir) else ("tfds:fashion_mnist", "tfds")
    splits = [("train", "training", cfg.n_train, f"{cfg.train_size}"), ("validation", "validation", cfg.val_size, "")]
    if test:
        splits.append(("test", "testing", 10000, ""))
    out = []
    for name, context, rows, extra in splits:
        settings = f"{files}|test" if name == "test" else f"{files}|{name}|val_size={cfg.val_size}|seed={seed}|{extra}"
        digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
        out.append(SplitRecord(f"fashion_mnist/{name}", context, digest, source, source_type, rows))
    return out


def load(cfg: DataConfig, seed: int) -> Dataset:
    """Load Fashion-MNIST from the configured source and split it."""
    arrays, source = load_arrays(cfg.source, cfg.dir, cfg.verify, cfg.tfds_dir)
    return split(*arrays, cfg, seed, source)


def synthetic_dataset(n_train: int = 512, n_val: int = 256, n_test: int = 256, seed: int = 0) -> Dataset:
    """A small SYNTHETIC (not Fashion-MNIST) learnable set for tests.

    Class c = stripe orientation (c % 2) x brightness level (c // 2), with random phase and
    noise: position-free, so a CNN with global average pooling can learn it.
    """
    rng = np.random.default_rng(seed)
    grid = np.arange(28)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n).astype(np.int32)
        phase = rng.integers(0, 4, n)[:, None, None]
        rows = ((grid[None, :, None] + phase) // 2 % 2).repeat(28, axis=2)  # horizontal stripes
        cols = ((grid[None, None, :] + phase) // 2 % 2).repeat(28, axis=1)  # vertical stripes
        stripes = np.where((y % 2 == 0)[:, None, None], rows, cols)
        level = 40 + 35 * (y // 2)[:, None, None]
        x = stripes * level + rng.integers(0, 30, (n, 28, 28))
        return np.clip(x, 0, 255).astype(np.uint8)[..., None], y

    (xt, yt), (xv, yv), (xs, ys) = make(n_train), make(n_val), make(n_test)
    return Dataset(xt, yt, xv, yv, xs, ys, float(xt.mean() / 255), float(xt.std() / 255), "synthetic")


def synthetic_load(cfg: DataConfig, seed: int) -> Dataset:
    """A loader with `load`'s signature returning SYNTHETIC data (train_size or 512 images), for tests of the evaluation paths."""
    return synthetic_dataset(cfg.train_size or 512, cfg.val_size, 256, seed)
