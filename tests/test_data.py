import gzip
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, needs_real_data

from fmnas_jax import data as data_mod
from fmnas_jax.data import (
    DataConfig,
    DataError,
    FashionMnistData,
    FolderData,
    NpzData,
    TfdsData,
    load,
    load_arrays,
    load_idx_dir,
    stratified_indices,
    synthetic_dataset,
    tfds_file_order,
)


@needs_real_data
def test_real_fashion_mnist_loads_and_verifies():
    x, y, xt, yt = load_idx_dir(REAL_DATA)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10


def test_gzipped_idx_files_are_decompressed_once_per_version_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (50, 6, 5), np.uint8), "t10k": rng.integers(0, 256, (20, 6, 5), np.uint8)}
    for split, x in images.items():
        n, h, w = x.shape
        head = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + h.to_bytes(4, "big") + w.to_bytes(4, "big")
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + x.tobytes()))
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + (np.arange(n) % 3).astype(np.uint8).tobytes()
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    first = load_idx_dir(folder, verify=False)
    kept = sorted(data_mod.idx_cache().iterdir())
    assert len(kept) == 4
    inodes = [p.stat().st_ino for p in kept]
    second = load_idx_dir(folder, verify=False)  # read from what was kept: nothing written again
    assert [p.stat().st_ino for p in sorted(data_mod.idx_cache().iterdir())] == inodes
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert np.array_equal(first[0][..., 0], images["train"])
    train = next(p for p in kept if p.name.startswith("train-images"))
    train.write_bytes(train.read_bytes()[:-7])  # a damaged copy is not used, and is made again
    assert np.array_equal(load_idx_dir(folder, verify=False)[0][..., 0], images["train"])
    new = images["train"][::-1].copy()  # the file changed: its new version is read, not the kept one
    head = (2051).to_bytes(4, "big") + (50).to_bytes(4, "big") + (6).to_bytes(4, "big") + (5).to_bytes(4, "big")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + new.tobytes(), mtime=1))
    assert np.array_equal(load_idx_dir(folder, verify=False)[0][..., 0], new)
    assert len(list(data_mod.idx_cache().iterdir())) == 5  # the old version is kept among the last IDX_KEPT used
    monkeypatch.setattr(data_mod, "IDX_KEPT", 4)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images["train"].tobytes(), mtime=2))
    load_idx_dir(folder, verify=False)
    assert len(list(data_mod.idx_cache().iterdir())) == 4  # bounded: the least recently used went


@needs_real_data
def test_split_is_stratified_seeded_and_disjoint():
    a = load(FashionMnistData(val_size=5000), seed=0)
    b = load(FashionMnistData(val_size=5000), seed=0)
    c = load(FashionMnistData(val_size=5000), seed=1)
    assert len(a.y_train) == 55000 and len(a.y_val) == 5000 and len(a.y_test) == 10000
    assert np.bincount(a.y_val).tolist() == [500] * 10
    assert np.array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    sub = load(FashionMnistData(val_size=1000, train_size=2000), seed=0)
    assert np.bincount(sub.y_train).tolist() == [200] * 10
    assert len(a.mean) == len(a.std) == 1 and 0.28 < a.mean[0] < 0.29 and 0.35 < a.std[0] < 0.36  # one channel


def test_stratified_indices_handle_remainders():
    labels = np.repeat(np.arange(3), [5, 3, 2])
    idx = stratified_indices(labels, 5, np.random.default_rng(0))
    assert len(idx) == 5 and len(set(idx)) == 5


def test_missing_dir_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_idx_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        load_idx_dir(tmp_path)


@needs_real_data
def test_truncated_and_corrupted_files_are_refused(tmp_path):
    for f in REAL_DATA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-10]))  # a valid gzip of a truncated file
    with pytest.raises(DataError, match="sha256"):
        load_idx_dir(tmp_path)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx_dir(tmp_path, verify=False)
    labels.write_bytes(gzip.compress(raw)[:100])  # a truncated gzip stream
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx_dir(tmp_path)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="data.source 'web'"):
        DataConfig(source="web")
    with pytest.raises(ValueError, match="data.val_size -5"):
        FashionMnistData(val_size=-5)
    with pytest.raises(ValueError, match="data.train_size 0"):
        FashionMnistData(train_size=0)
    with pytest.raises(ValueError, match="data=npz needs data.path"):
        NpzData()
    with pytest.raises(ValueError, match=r"data.image_size \[8\] must be null or \[height, width\]"):
        FolderData(dir="photos", image_size=(8,))
    with pytest.raises(ValueError, match="choose the data with data=tfds"):
        FashionMnistData(source="tfds")


def test_synthetic_set_is_labelled_synthetic():
    d = synthetic_dataset(64, 32, 32)
    assert d.source == "synthetic" and d.x_train.shape == (64, 28, 28, 1)


needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tensorflow_datasets") is None,
    reason="preparing a TFDS dataset needs TensorFlow: pip install -e '.[tfds-prepare]' (README's test command does)",
)


@pytest.mark.slow
@needs_real_data
@needs_tensorflow
def test_tfds_source_reads_what_tfds_wrote_in_the_idx_files_order(tmp_path):
    # TFDS's own FashionMNIST builder writes the real IDX files' first 1,000 training and 200 test images into a
    # data_dir (no network), as fashion_mnist and as fashion_mnist_head; TensorFlow only in that subprocess.
    prep = subprocess.run([sys.executable, str(Path(__file__).with_name("tfds_prepare.py")), str(REAL_DATA), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert (tmp_path / "fashion_mnist" / "3.0.1" / "dataset_info.json").exists()
    x, y, xt, yt = load_idx_dir(REAL_DATA)
    head = (x[:1000], y[:1000], xt[:200], yt[:200])
    # fashion_mnist comes back in the files' order (TFDS stored it shuffled), so a seeded split picks the same images
    # from either source: results do not depend on where the data came from.
    from_tfds = load_arrays(TfdsData(tfds_dir=str(tmp_path), verify=False, val_size=100))
    assert from_tfds.info.source == "tfds:fashion_mnist" and from_tfds.info.class_names == data_mod.CLASS_NAMES
    for a, b in zip((from_tfds.x_train, from_tfds.y_train, from_tfds.x_test, from_tfds.y_test), head, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    # With verify, the arrays must be the IDX files byte for byte (these 1,200 are not: refused, as a corrupt or
    # foreign copy would be); the real files' 70,000 in that order pass, as the check computes their sha256.
    with pytest.raises(DataError, match=r"fashion_mnist/train in .* does not match Fashion-MNIST's train-images-idx3-ubyte"):
        load_arrays(TfdsData(tfds_dir=str(tmp_path), val_size=100))
    for array, stem in ((x[..., 0], "train-images-idx3-ubyte"), (y.astype(np.uint8), "train-labels-idx1-ubyte"),
                        (xt[..., 0], "t10k-images-idx3-ubyte"), (yt.astype(np.uint8), "t10k-labels-idx1-ubyte")):  # fmt: skip
        assert data_mod._idx_sha256(array, "images" in stem) == data_mod.SHA256[stem]
        assert data_mod._idx_sha256(array[::-1], "images" in stem) != data_mod.SHA256[stem]  # another order fails it
    # Any other TFDS dataset by name (data.name): TFDS's own order, its label names, its own digest.
    other = load_arrays(TfdsData(name="fashion_mnist_head", tfds_dir=str(tmp_path), val_size=100))
    assert other.info.source == "tfds:fashion_mnist_head" and other.info.name == "fashion_mnist_head"
    assert other.info.class_names == data_mod.CLASS_NAMES and other.info.digest != data_mod.FASHION_MNIST_DIGEST
    assert other.x_train.shape == (1000, 28, 28, 1) and other.x_test.shape == (200, 28, 28, 1) and other.y_train.dtype == np.int32
    by_bytes = lambda x: sorted(img.tobytes() for img in x)  # noqa: E731  # the same images, in another order
    assert by_bytes(other.x_train) == by_bytes(head[0]) and by_bytes(other.x_test) == by_bytes(head[2])
    assert not np.array_equal(other.x_train, head[0])


def test_tfds_file_order_is_a_permutation_of_the_keys():
    order = tfds_file_order("test", 1000)
    assert sorted(order.tolist()) == list(range(1000)) and not np.array_equal(order, np.arange(1000))
    assert np.array_equal(order, tfds_file_order("test", 1000)) and not np.array_equal(order, tfds_file_order("train", 1000))
