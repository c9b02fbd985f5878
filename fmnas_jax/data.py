"""The data: Fashion-MNIST (IDX files or tfds, checked by sha256) or the user's own (any IDX folder, a NumPy
archive, a class-per-subfolder image tree), its checks, and seeded stratified splits.

Arrays stay uint8 images (N, height, width, channels) and int32 labels; the trainer normalises on
the device with the training split's mean and std, which travel with the Dataset.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fmnas_jax.caches import cache_home, write_atomically
from fmnas_jax.genome import ImageShape

# The inputs' normalisation: (mean, std) per channel, on the 0..1 scale of the uint8 images divided by 255.
Normalisation = tuple[tuple[float, ...], tuple[float, ...]]
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
HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}), point data.dir at a folder holding the four original IDX files "
    "(train-images-idx3-ubyte[.gz], ...), or use data=tfds on a machine with internet."
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class DataError(RuntimeError):
    """The dataset is missing, truncated or corrupt."""


TRAIN_IMAGES = 60_000  # Fashion-MNIST's training images, the validation split carved from them


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split: `source` (conf/data/<source>.yaml) picks the reader, and each
    source's own settings are its subclass below; the split's settings are every source's."""

    source: str = "fashion_mnist"
    val_size: int = 5000  # stratified validation split carved from the training images
    train_size: int | None = None  # null: every training image left after validation; a number: a stratified subset

    def __post_init__(self) -> None:
        if self.source not in DATA_CONFIGS:
            raise ValueError(f"data.source {self.source!r} is not one of {list(DATA_CONFIGS)}")
        own = type(self).__dataclass_fields__["source"].default
        if type(self) is not DataConfig and self.source != own:
            raise ValueError(f"data.source {self.source!r} on {type(self).__name__}, the settings of {own!r}: "
                             f"choose the data with data={self.source}")  # fmt: skip
        if self.val_size < 10 or self.val_size > 30000:
            raise ValueError(f"data.val_size {self.val_size} must be in [10..30000] (a multiple of 10 keeps it stratified)")
        if self.train_size is not None and self.train_size < 10:
            raise ValueError(f"data.train_size {self.train_size} must be null or at least 10")
        if self.fashion and self.train_size is not None and self.train_size > TRAIN_IMAGES - self.val_size:
            raise ValueError(f"data.train_size {self.train_size} must be null or in [10..{TRAIN_IMAGES - self.val_size}]")

    @property
    def fashion(self) -> bool:
        """Whether this reads Fashion-MNIST's own files (checked against their sha256)."""
        return False

    def read(self) -> Read:
        """The four arrays and what they are, read and checked (`load_arrays` caches it)."""
        raise DataError(f"data.source {self.source!r}: choose the data with data=<{'|'.join(DATA_CONFIGS)}>")

    @property
    def n_train(self) -> int:
        """Training images this config gives: train_size, or the rest of the training images after validation."""
        if self.train_size is not None:
            return self.train_size
        return TRAIN_IMAGES - self.val_size if self.fashion else load_arrays(self).train_pool(self.val_size)

    def result_settings(self) -> dict:
        """Settings that change an evaluation's result (for the eval key): the split's sizes and, for any data other
        than Fashion-MNIST, the data's digest (Fashion-MNIST's keys stay what they were before other data existed)."""
        settings: dict = {"val_size": self.val_size, "train_size": self.train_size}
        if not self.fashion:
            info = load_arrays(self).info
            if info.digest != FASHION_MNIST_DIGEST:
                settings["data"] = info.digest
        return settings


@dataclass(frozen=True)
class Read:
    """What a source read: the arrays (x_train, y_train, x_test, y_test), class names (None: numbered), where it was
    read (a resolved path, or tfds:<name>), the dataset's name and MLflow's source type (local | tfds)."""

    arrays: tuple[np.ndarray, ...]
    class_names: tuple[str, ...] | None
    where: str
    name: str
    source_type: str


def _local(path: str, arrays: tuple[np.ndarray, ...], names: tuple[str, ...] | None, name: str | None) -> Read:
    where = Path(path).resolve()
    return Read(arrays, names, str(where), name or (where.stem if where.is_file() else where.name), "local")


def _read_idx(folder: str, verify: bool, name: str | None) -> Read:
    x, y, xt, yt = load_idx_dir(folder, verify)
    return _local(folder, (*check_arrays(x, y, folder), *check_arrays(xt, yt, folder)), None, name)


def _check_test_size(test_size: int | None) -> None:
    if test_size is not None and test_size < 10:
        raise ValueError(f"data.test_size {test_size} must be null or at least 10")


@dataclass(frozen=True)
class FashionMnistData(DataConfig):
    """data=fashion_mnist (the default): Fashion-MNIST's four IDX files (Debian's dataset-fashion-mnist)."""

    source: str = "fashion_mnist"
    dir: str = DEBIAN_DIR  # the folder of the four IDX files
    verify: bool = True  # their sha256

    @property
    def fashion(self) -> bool:
        return True

    def read(self) -> Read:
        return _read_idx(self.dir, self.verify, None)


@dataclass(frozen=True)
class IdxData(DataConfig):
    """data=idx: any folder of the four IDX files MNIST-style datasets ship, any image size."""

    source: str = "idx"
    dir: str = ""  # the folder of the four files
    verify: bool = False  # true: check them against Fashion-MNIST's sha256
    name: str | None = None  # the dataset's name in MLflow and reports (null: the folder's name)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dir:
            raise ValueError("data=idx needs data.dir: the folder of the four IDX files")

    @property
    def fashion(self) -> bool:
        return self.verify

    def read(self) -> Read:
        return _read_idx(self.dir, self.verify, self.name)


@dataclass(frozen=True)
class NpzData(DataConfig):
    """data=npz: a NumPy archive with x_train, y_train (x_test and y_test, class_names optional)."""

    source: str = "npz"
    path: str = ""  # the .npz file
    name: str | None = None  # the dataset's name in MLflow and reports (null: the file's name)
    test_size: int | None = None  # without x_test: the stratified test split carved out first (null: a fifth)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("data=npz needs data.path: a .npz file with x_train and y_train (and x_test, y_test)")
        _check_test_size(self.test_size)

    def read(self) -> Read:
        arrays, names = load_npz(self.path, self.test_size)
        return _local(self.path, arrays, names, self.name)


@dataclass(frozen=True)
class FolderData(DataConfig):
    """data=folder: a class-per-subfolder tree of images (or train/ and test/ trees), read with Pillow."""

    source: str = "folder"
    dir: str = ""  # the tree's root
    name: str | None = None  # the dataset's name in MLflow and reports (null: the folder's name)
    image_size: tuple[int, ...] | None = None  # [height, width]: resize every image on load; null: all must agree
    test_size: int | None = None  # without test/: the stratified test split carved out first (null: a fifth)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dir:
            raise ValueError("data=folder needs data.dir: a folder with one subfolder of images per class")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"data.image_size {list(self.image_size)} must be null or [height, width], both positive")
        _check_test_size(self.test_size)

    def read(self) -> Read:
        arrays, names = load_folder(self.dir, self.image_size, self.test_size)
        return _local(self.dir, arrays, names, self.name)


@dataclass(frozen=True)
class TfdsData(DataConfig):
    """data=tfds: a TensorFlow Datasets image-classification dataset by name, from a prepared data_dir."""

    source: str = "tfds"
    name: str = "fashion_mnist"  # the TFDS dataset (mnist, kmnist, emnist/letters, cifar10, ...)
    tfds_dir: str | None = None  # TFDS's data_dir (null = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    verify: bool = True  # fashion_mnist: the sha256 of the IDX files

    @property
    def fashion(self) -> bool:
        return self.name == "fashion_mnist"

    def read(self) -> Read:
        arrays, names = load_tfds(self.tfds_dir, self.verify, self.name)
        return Read(arrays, names, f"tfds:{self.name}", self.name, "tfds")


DATA_CONFIGS: dict[str, type[DataConfig]] = {
    "fashion_mnist": FashionMnistData,
    "idx": IdxData,
    "npz": NpzData,
    "folder": FolderData,
    "tfds": TfdsData,
}


@dataclass(frozen=True)
class DataInfo:
    """What the data is: its name, shape, class names and a digest of its contents."""

    name: str
    image: ImageShape
    class_names: tuple[str, ...]
    digest: str  # sha256 of the images and labels of both splits (16 hex digits)
    source: str  # where it was read: a folder, a file, tfds:<name>
    source_type: str  # local | tfds


@dataclass(frozen=True)
class Arrays:
    """The raw training and test arrays and what they are."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: DataInfo

    def train_pool(self, val_size: int) -> int:
        return len(self.y_train) - val_size


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test splits plus the normalisation taken from the train split."""

    x_train: np.ndarray  # (N, height, width, channels) uint8
    y_train: np.ndarray  # (N,) int32
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    source: str
    class_names: tuple[str, ...] = CLASS_NAMES
    pool: int = TRAIN_IMAGES - 5000  # training images the data has after validation (every train_size fits in it)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.class_names

    @property
    def image(self) -> ImageShape:
        return ImageShape(*self.x_train.shape[1:], len(self.class_names))

    @property
    def normalisation(self) -> Normalisation:
        return self.mean, self.std

    def summary(self) -> str:
        show = lambda v: ", ".join(f"{c:.4f}" for c in v)  # noqa: E731
        return (
            f"{self.source}: {self.image}, train {len(self.y_train)}, val {len(self.y_val)}, test {len(self.y_test)} "
            f"(mean {show(self.mean)}, std {show(self.std)}{' per channel' * (len(self.mean) > 1)})"
        )


def as_normalisation(norm: object) -> Normalisation:
    """(mean, std) per channel from a (2, channels) array or pair; a checkpoint written before per-channel
    normalisation stored one float each."""
    mean, std = (tuple(float(v) for v in np.atleast_1d(np.asarray(part, np.float64))) for part in norm)  # type: ignore[union-attr]
    return mean, std


def channel_stats(x: np.ndarray) -> Normalisation:
    """Per-channel mean and standard deviation of uint8 images (N, height, width, channels), on the 0..1 scale."""
    channels = range(x.shape[-1])
    return tuple(float(x[..., c].mean() / 255.0) for c in channels), tuple(float(x[..., c].std() / 255.0) for c in channels)


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def _read_idx_bytes(folder: Path, stem: str) -> bytes:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.exists():
            try:
                return _gunzipped(path) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError) as e:
                raise DataError(f"{path} is truncated or corrupt ({e}). {HOW_TO_GET}") from e
    raise DataError(f"IDX file {stem}[.gz] not found in {folder}. {HOW_TO_GET}")


IDX_KEPT = 8  # decompressed IDX files kept (two datasets' four)


def idx_cache() -> Path:
    """Where gzipped IDX files are kept decompressed: $XDG_CACHE_HOME/fmnas_jax/idx (~/.cache by default)."""
    return cache_home() / "idx"


def _gunzipped(path: Path) -> bytes:
    """A gzipped file's bytes, decompressed once per version of the file (its path, size and modification time) and
    kept in idx_cache(): gunzip is ~0.3 s of every process on a 2-core CPU for Fashion-MNIST's training images. A kept
    copy is used only if its length is the one the gzip trailer records; the caller checks the bytes as before."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    kept = idx_cache() / f"{path.stem}-{key}"
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        size = int.from_bytes(f.read(4), "little")  # the uncompressed length modulo 2**32 (RFC 1952)
    try:
        raw = kept.read_bytes()
        if len(raw) % 2**32 == size:
            os.utime(kept)  # used now: the last to go (below)
            return raw
    except OSError:
        pass
    with gzip.open(path) as f:
        raw = f.read()
    try:
        write_atomically(kept, raw)
        # Bounded: the IDX_KEPT files used last (a dataset is four), so copies read once do not pile up.
        older = sorted((p for p in kept.parent.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in older[IDX_KEPT:]:
            p.unlink(missing_ok=True)
    except OSError:  # no home folder, a read-only or full cache: decompressed again next time
        pass
    return raw


def decode_idx(raw: bytes, name: str, images: bool) -> np.ndarray:
    """Decoded IDX bytes: (N, rows, columns) uint8 images or (N,) labels; ValueError names what is wrong."""
    header = 16 if images else 8
    magic = 2051 if images else 2049
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{name} is not an IDX {'image' if images else 'label'} file (magic {magic} expected)")
    n = int.from_bytes(raw[4:8], "big")
    shape = (n, int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")) if images else (n,)
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{name} has {len(raw)} bytes, expected {expected}: truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx_dir(folder: str | os.PathLike, verify: bool = True) -> tuple[np.ndarray, ...]:
    """Read the four IDX files: (x_train, y_train, x_test, y_test), images (N, rows, columns, 1); `verify`: Fashion-MNIST's sha256."""
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


def _tfds_split(name: str, split: str, data_dir: str | None) -> tuple[list, Any]:
    """Every example of TFDS's `name`/`split` (one batched read and decode) and the dataset's DatasetInfo."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"data=tfds needs tensorflow-datasets (pip install 'fmnas_jax[tfds]'). {HOW_TO_GET}") from e
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir)
        return ds.__getitems__(list(range(len(ds)))), ds.dataset_info
    except Exception as e:
        where = data_dir or "TFDS's default data_dir"
        raise DataError(f"tensorflow-datasets could not read {name}/{split} from {where}: {e}. {HOW_TO_GET}") from e


def load_tfds(
    data_dir: str | None = None, verify: bool = True, name: str = "fashion_mnist"
) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """A TFDS image-classification dataset (`image` and `label` features, `train` and `test` splits) from a prepared
    `data_dir` (or TFDS downloads it): (x_train, y_train, x_test, y_test) and the label's class names. Fashion-MNIST
    comes back in the IDX files' order and, with `verify`, checked against their sha256; any other in TFDS's order."""
    out: list[np.ndarray] = []
    names: tuple[str, ...] = ()
    for split, stem in (("train", "train"), ("test", "t10k")):
        examples, info = _tfds_split(name, split, data_dir)
        names = tuple(info.features["label"].names)
        try:
            x = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
            y = np.asarray([ex["label"] for ex in examples], np.int64)
        except (KeyError, ValueError) as e:
            raise DataError(f"tensorflow-datasets' {name}/{split}: not images of one size with labels ({e})") from e
        x = x[..., None] if x.ndim == 3 else x
        if name == "fashion_mnist":
            x, y = _fashion_in_file_order(x, y, split, stem, data_dir, verify)
        out += list(check_arrays(x, y, f"tfds:{name}/{split}"))
    return tuple(out), names


def _fashion_in_file_order(x: np.ndarray, y: np.ndarray, split: str, stem: str, data_dir: str | None, verify: bool):
    """TFDS's Fashion-MNIST records put back in the IDX files' order, checked against their sha256 with `verify`."""
    files_x, files_y = np.empty_like(x), np.empty_like(y)
    order = tfds_file_order(split, len(y))
    files_x[order], files_y[order] = x, y
    where = data_dir or "TFDS's default data_dir"
    if verify:
        for array, kind in ((files_x[..., 0], "images"), (files_y.astype(np.uint8), "labels")):
            name = f"{stem}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            if _idx_sha256(array, kind == "images") != SHA256[name]:
                raise DataError(f"tensorflow-datasets' fashion_mnist/{split} in {where} does not match Fashion-MNIST's "
                                f"{name} (sha256): another dataset, or written in another order. {HOW_TO_GET}")  # fmt: skip
    return files_x, files_y


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


def split(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, cfg: DataConfig, seed: int, source: str,
          class_names: tuple[str, ...] = CLASS_NAMES) -> Dataset:  # fmt: skip
    """Carve a stratified validation split (and optional train subset) from the training set."""
    rng = np.random.default_rng([seed, 0xDA7A])
    val_idx = stratified_indices(y, cfg.val_size, rng)
    rest = np.setdiff1d(np.arange(len(y)), val_idx)
    if cfg.train_size is not None:
        rest = rest[stratified_indices(y[rest], cfg.train_size, rng)]
    x_train = x[rest]
    mean, std = channel_stats(x_train)
    return Dataset(x_train, y[rest], x[val_idx], y[val_idx], x_test, y_test, mean, std, source, class_names, len(y) - cfg.val_size)


def content_digest(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> str:
    """16 hex digits of the sha256 of both splits' images and labels (shapes included): the data's identity."""
    h = hashlib.sha256()
    for a, dtype in ((x_train, np.uint8), (y_train, np.int32), (x_test, np.uint8), (y_test, np.int32)):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype).tobytes())
    return h.hexdigest()[:16]


FASHION_MNIST_DIGEST = "690bb3f5c635d3f3"  # content_digest of Fashion-MNIST (checked by tests/test_data.py)


def check_arrays(x: np.ndarray, y: np.ndarray, where: str, classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, H, W, C) uint8 and labels as (N,) int32, or DataError naming `where` and what is wrong."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3], default=0) < 1:
        raise DataError(f"{where}: images must be (N, height, width) or (N, height, width, 1 or 3 channels), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: {len(x)} images but labels of shape {y.shape}: one label per image expected")
    if len(x) == 0:
        raise DataError(f"{where}: no images")
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images hold non-finite values (NaN or inf)")
        raise DataError(f"{where}: images are {x.dtype}: store them as uint8 pixel values 0..255 (e.g. (x * 255).round().astype('uint8') "
                        "for images scaled to 0..1)")  # fmt: skip
    if x.dtype.kind not in "ui" or (x.size and (x.min() < 0 or x.max() > 255)):
        raise DataError(f"{where}: images must be integer pixel values 0..255, got {x.dtype} in [{x.min()}..{x.max()}]")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError(f"{where}: labels hold non-finite values (NaN or inf)")
    if y.dtype.kind not in "ui" and not (y.dtype.kind == "f" and (y == np.round(y)).all()):
        raise DataError(f"{where}: labels must be integer class ids 0..K-1, got {y.dtype}")
    k = classes if classes is not None else int(y.max()) + 1
    bad = y[(y < 0) | (y >= k)]
    if len(bad):
        raise DataError(f"{where}: labels {sorted(set(bad.tolist()))[:5]} are outside 0..{k - 1} ({k} classes)")
    return x.astype(np.uint8), y.astype(np.int32)


def _check_classes(y_train: np.ndarray, names: tuple[str, ...], where: str, val_size: int) -> None:
    if len(names) < 2:
        raise DataError(f"{where}: {len(names)} class: a classification needs at least 2")
    counts = np.bincount(y_train, minlength=len(names))
    few = [f"{names[c]} ({n})" for c, n in enumerate(counts) if n < 2]
    if few:
        raise DataError(f"{where}: classes {few} have fewer than 2 training images: too few for the stratified splits")
    if val_size > len(y_train) - 10:
        raise DataError(f"{where}: data.val_size {val_size} leaves fewer than 10 of its {len(y_train)} training images to train on")


def _carve_test(x: np.ndarray, y: np.ndarray, test_size: int | None, where: str) -> tuple[np.ndarray, ...]:
    """A stratified test split of `test_size` images (None: a fifth) out of (x, y) (seeded: the same data gives the same
    split)."""
    test_size = len(y) // 5 if test_size is None else test_size
    if test_size > len(y) // 2:
        raise DataError(f"{where}: data.test_size {test_size} is more than half of its {len(y)} images")
    test = stratified_indices(y, test_size, np.random.default_rng(0x7E57))
    rest = np.setdiff1d(np.arange(len(y)), test)
    return x[rest], y[rest], x[test], y[test]


def load_npz(path: str, test_size: int | None) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """(x_train, y_train, x_test, y_test) and class names from a NumPy archive with x_train and y_train (x_test,
    y_test and class_names optional); without a test split one is carved out, stratified."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path {path!r} does not exist (data=npz needs a .npz file)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"data.path {path!r} is not a readable .npz archive: {e}") from e
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        missing += [k for k in ("x_test", "y_test") if k not in arrays and ("x_test" in arrays or "y_test" in arrays)]
        raise DataError(f"{path} lacks {missing}: it needs x_train and y_train, and x_test with y_test or neither (has {sorted(arrays)})")
    names = tuple(str(n) for n in arrays["class_names"]) if "class_names" in arrays else None
    k = len(names) if names else None
    x, y = check_arrays(arrays["x_train"], arrays["y_train"], f"{path} (x_train, y_train)", k)
    if "x_test" in arrays:
        xt, yt = check_arrays(arrays["x_test"], arrays["y_test"], f"{path} (x_test, y_test)", k)
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test's images are {xt.shape[1:]}, x_train's {x.shape[1:]}: one shape expected")
    else:
        x, y, xt, yt = _carve_test(x, y, test_size, path)
    names = names or tuple(str(c) for c in range(max(int(y.max()), int(yt.max())) + 1))
    return (x, y, xt, yt), names


def _read_image(path: Path, size: tuple[int, ...] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im = opened.convert("L" if opened.mode in ("1", "L", "I;16", "I", "F") else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(im, np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"image {path} could not be read: {e}") from e


def _read_tree(root: Path, size: tuple[int, ...] | None, names: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                                   tuple[str, ...]]:  # fmt: skip
    """Images of a class-per-subfolder tree in file-name order across the classes (numbered files keep their order)."""
    classes = names or tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise DataError(f"data.dir {str(root)!r} has no class subfolders (expected <class>/<image>.png, ...)")
    found = []
    for c, name in enumerate(classes):
        files = [f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS] if (root / name).is_dir() else []
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        found += [(f.name, c, f) for f in files]
    found.sort(key=lambda t: (t[0], t[1]))
    images = [_read_image(f, size) for _, _, f in found]
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise DataError(f"{root}: images of {len(shapes)} sizes or modes ({shapes[:3]}): set data.image_size=[height,width] to resize "
                        "them (greyscale and colour images cannot be mixed)")  # fmt: skip
    return np.stack(images), np.asarray([c for _, c, _ in found], np.int32), classes


def load_folder(folder: str, size: tuple[int, ...] | None, test_size: int | None) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """A class-per-subfolder tree of images (class names from the sorted folder names), or train/ and test/ trees of
    the same classes; without test/ a stratified test split is carved out."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data.dir {folder!r} does not exist (data=folder needs a folder of class subfolders)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        x, y, names = _read_tree(root / "train", size)
        xt, yt, _ = _read_tree(root / "test", size, names)
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{root}: test images are {xt.shape[1:]}, training images {x.shape[1:]}: set data.image_size")
    else:
        x, y, names = _read_tree(root, size)
        x, y, xt, yt = _carve_test(x, y, test_size, folder)
    return (*check_arrays(x, y, str(root), len(names)), *check_arrays(xt, yt, str(root), len(names))), names


def load_arrays(cfg: DataConfig) -> Arrays:
    """The raw training and test arrays of `cfg`'s data (in the files' order) and what they are.

    Read and checked once per process (a job checks the data before it opens the store, then trains and
    reports from it): the arrays are shared, read-only. DataError when the split sizes do not fit the data."""
    a = _read_arrays(replace(cfg, val_size=5000, train_size=None))
    _check_classes(a.y_train, a.info.class_names, a.info.source, cfg.val_size)
    if cfg.train_size is not None and cfg.train_size > len(a.y_train) - cfg.val_size:
        raise DataError(f"data.train_size {cfg.train_size} is more than the {len(a.y_train) - cfg.val_size} training images "
                        f"{a.info.source} has after data.val_size {cfg.val_size}")  # fmt: skip
    return a


@functools.lru_cache(maxsize=2)
def _read_arrays(cfg: DataConfig) -> Arrays:
    """`load_arrays` without the split's checks, cached by the settings that choose the data."""
    r = cfg.read()
    x, y, xt, yt = r.arrays
    if xt.shape[1:] != x.shape[1:]:
        raise DataError(f"{r.where}: test images are {xt.shape[1:]}, training images {x.shape[1:]}: one shape expected")
    digest = content_digest(*r.arrays)
    name, names = ("fashion_mnist", CLASS_NAMES) if digest == FASHION_MNIST_DIGEST else (r.name, r.class_names)
    name = getattr(cfg, "name", None) or name
    names = names or tuple(str(c) for c in range(max(int(y.max()), int(yt.max())) + 1))
    if len(names) < 2:
        raise DataError(f"{r.where}: {len(names)} class: a classification needs at least 2")
    info = DataInfo(name, ImageShape(x.shape[1], x.shape[2], x.shape[3], len(names)), names, digest, r.where, r.source_type)
    return Arrays(*_read_only(r.arrays), info)


load_arrays.cache_clear = _read_arrays.cache_clear  # type: ignore[attr-defined]  # read the files again (tests)


def _read_only(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@dataclass(frozen=True)
class SplitRecord:
    """What one split an evaluation used is, for the results store (MLflow's dataset inputs)."""

    name: str  # <data>/train, <data>/validation, <data>/test
    context: str  # training | validation | testing
    digest: str  # 16 hex digits: the data's digest, the split's settings and the seed
    source: str  # the folder or file, or tfds:fashion_mnist
    source_type: str  # local | tfds
    rows: int


def split_records(cfg: DataConfig, seed: int, test: bool = True) -> list[SplitRecord]:
    """The train/validation(/test) splits an evaluation with these settings uses (Fashion-MNIST's are named without
    reading it; other data is read once per process)."""
    if cfg.fashion:
        files = ",".join(SHA256.values())
        source, source_type = ("tfds:fashion_mnist", "tfds")
        if isinstance(cfg, FashionMnistData | IdxData):
            source, source_type = str(Path(cfg.dir).resolve()), "local"
        name, n_test = "fashion_mnist", 10000
    else:
        arrays = load_arrays(cfg)
        info = arrays.info
        files, source, source_type, name, n_test = info.digest, info.source, info.source_type, info.name, len(arrays.y_test)
    splits = [("train", "training", cfg.n_train, f"{cfg.train_size}"), ("validation", "validation", cfg.val_size, "")]
    if test:
        splits.append(("test", "testing", n_test, ""))
    out = []
    for split_name, context, rows, extra in splits:
        settings = f"{files}|test" if split_name == "test" else f"{files}|{split_name}|val_size={cfg.val_size}|seed={seed}|{extra}"
        digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
        out.append(SplitRecord(f"{name}/{split_name}", context, digest, source, source_type, rows))
    return out


def data_info(cfg: DataConfig) -> DataInfo:
    """What `cfg`'s data is (read and checked once per process)."""
    return load_arrays(cfg).info


def load(cfg: DataConfig, seed: int) -> Dataset:
    """Load the configured data and split it."""
    a = load_arrays(cfg)
    kind = "idx" if isinstance(cfg, FashionMnistData) else cfg.source
    where = a.info.source if a.info.source_type == "tfds" else f"{kind}:{a.info.source}"
    return split(a.x_train, a.y_train, a.x_test, a.y_test, cfg, seed, where, a.info.class_names)


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
    return Dataset(xt, yt, xv, yv, xs, ys, *channel_stats(xt), "synthetic")


def synthetic_load(cfg: DataConfig, seed: int) -> Dataset:
    """A loader with `load`'s signature returning SYNTHETIC data (train_size or 512 images), for tests of the evaluation paths."""
    return synthetic_dataset(cfg.train_size or 512, cfg.val_size, 256, seed)
