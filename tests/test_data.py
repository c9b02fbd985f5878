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
from fmnas_jax.data import DataConfig, DataError, load, load_arrays, load_idx_dir, stratified_indices, synthetic_dataset, tfds_file_order


@needs_real_data
def test_real_fashion_mnist_loads_and_verifies():
    x, y, xt, yt = load_idx_dir(REAL_DATA)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10


@needs_real_data
def test_split_is_stratified_seeded_and_disjoint():
    a = load(DataConfig(val_size=5000), seed=0)
    b = load(DataConfig(val_size=5000), seed=0)
    c = load(DataConfig(val_size=5000), seed=1)
    assert len(a.y_train) == 55000 and len(a.y_val) == 5000 and len(a.y_test) == 10000
    assert np.bincount(a.y_val).tolist() == [500] * 10
    assert np.array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    sub = load(DataConfig(val_size=1000, train_size=2000), seed=0)
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
        DataConfig(val_size=-5)
    with pytest.raises(ValueError, match="data.train_size 0"):
        DataConfig(train_size=0)


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
def test_tfds_source_reads_what_tfds_wrote_and_equals_the_idx_source(tmp_path, monkeypatch):
    # TFDS's own FashionMNIST builder writes the local IDX files into a data_dir (no network), in a
    # separate process so TensorFlow stays out of this one; the project's tfds source reads it back.
    prep = subprocess.run([sys.executable, str(Path(__file__).with_name("tfds_prepare.py")), str(REAL_DATA), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert (tmp_path / "fashion_mnist" / "3.0.1" / "dataset_info.json").exists()
    tfds_cfg = DataConfig(source="tfds", dir="/nonexistent", tfds_dir=str(tmp_path))
    from_tfds, from_idx = load_arrays(tfds_cfg), load_arrays(DataConfig(source="idx", dir=str(REAL_DATA)))
    assert from_tfds.info.source == "tfds:fashion_mnist" and from_tfds.info.digest == from_idx.info.digest
    splits = lambda a: (a.x_train, a.y_train, a.x_test, a.y_test)  # noqa: E731
    for a, b in zip(splits(from_tfds), splits(from_idx), strict=True):  # TFDS stored them shuffled; read back in the files' order
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    # Any other TFDS dataset by name (data.name): TFDS's own order, its label names, its own digest.
    head = load_arrays(DataConfig(source="tfds", name="fashion_mnist_head", tfds_dir=str(tmp_path), val_size=100))
    assert head.info.source == "tfds:fashion_mnist_head" and head.info.name == "fashion_mnist_head"
    assert head.info.class_names == from_idx.info.class_names and head.info.digest != from_idx.info.digest
    assert head.x_train.shape == (1000, 28, 28, 1) and head.x_test.shape == (200, 28, 28, 1) and head.y_train.dtype == np.int32
    by_bytes = lambda x: sorted(img.tobytes() for img in x)  # noqa: E731  # the same images, in another order
    assert by_bytes(head.x_train) == by_bytes(from_idx.x_train[:1000]) and by_bytes(head.x_test) == by_bytes(from_idx.x_test[:200])
    # So a seeded split picks the same images from either source: results do not depend on where the data came from.
    # Read in any other order, the arrays fail the IDX files' sha256 (as a corrupt or foreign copy would).
    monkeypatch.setattr(data_mod, "tfds_file_order", lambda split, n: np.arange(n))
    load_arrays.cache_clear()  # read again, not the arrays this process already checked
    with pytest.raises(DataError, match=r"fashion_mnist/train in .* does not match Fashion-MNIST's train-images-idx3-ubyte"):
        load_arrays(tfds_cfg)


def test_tfds_file_order_is_a_permutation_of_the_keys():
    order = tfds_file_order("test", 1000)
    assert sorted(order.tolist()) == list(range(1000)) and not np.array_equal(order, np.arange(1000))
    assert np.array_equal(order, tfds_file_order("test", 1000)) and not np.array_equal(order, tfds_file_order("train", 1000))
