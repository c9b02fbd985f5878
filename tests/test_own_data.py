"""The user's own data: any IDX folder, a NumPy archive or a class-per-subfolder image tree, searched like Fashion-MNIST."""

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, needs_real_data
from helpers import job, runs
from PIL import Image

from fmnas_jax.data import (
    FASHION_MNIST_DIGEST,
    DataConfig,
    DataError,
    FashionMnistData,
    FolderData,
    IdxData,
    NpzData,
    load,
    load_arrays,
    load_idx_dir,
)
from fmnas_jax.evaluator import EvalSpec, budget_key
from fmnas_jax.genome import ImageShape
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate


def write_idx(folder: Path, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, a, magic in (("train-images-idx3-ubyte", x, 2051), ("train-labels-idx1-ubyte", y, 2049),
                           ("t10k-images-idx3-ubyte", xt, 2051), ("t10k-labels-idx1-ubyte", yt, 2049)):  # fmt: skip
        raw = np.ascontiguousarray(a[..., 0] if a.ndim == 4 else a, np.uint8)
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in raw.shape)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(header + raw.tobytes(), compresslevel=1))


def write_tree(root: Path, x: np.ndarray, y: np.ndarray, names: tuple[str, ...]) -> None:
    """One PNG per image in <root>/<class>/<index>.png (numbered: the tree keeps the arrays' order)."""
    for c in names:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(root / names[label] / f"{i:06d}.png")


def synthetic_32x32x3(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC colour images (not a real dataset): 5 classes told apart by which channel is bright and by stripes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    x = rng.integers(0, 60, (n, 32, 32, 3))
    x[np.arange(n), :, :, y % 3] += (60 * (1 + y // 3))[:, None, None]
    x[y >= 3, ::2] += 50
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int32)


def digits_npz(path: Path) -> Path:
    """scikit-learn's bundled handwritten digits (real: 1,797 images of 8 x 8, values 0..16) as an archive."""
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(path, x_train=d.images.astype(np.uint8), y_train=d.target, class_names=np.array([str(c) for c in range(10)]))
    return path


@needs_real_data
def test_fashion_mnist_as_an_archive_is_fashion_mnist(tmp_path):
    # The same arrays through another route are the same data: same digest, same names, the same eval keys (its
    # results in a store are reused), a store written before other data existed keeps serving them.
    x, y, xt, yt = load_idx_dir(REAL_DATA)
    np.savez(tmp_path / "fm.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    npz = NpzData(path=str(tmp_path / "fm.npz"))
    info = load_arrays(npz).info
    assert info.digest == FASHION_MNIST_DIGEST and info.name == "fashion_mnist" and info.class_names[0] == "T-shirt/top"
    spec = lambda data: EvalSpec(TrainConfig(), data, 0)  # noqa: E731
    assert budget_key(spec(npz)) == budget_key(spec(FashionMnistData()))
    assert FashionMnistData().result_settings() == {"val_size": 5000, "train_size": None}  # the keys stores already hold


@needs_real_data
def test_idx_archive_and_image_tree_give_the_same_arrays_splits_and_results(tmp_path):
    x, y, xt, yt = (a[:n] for a, n in zip(load_idx_dir(REAL_DATA), (600, 600, 200, 200), strict=True))
    names = tuple(f"c{c}" for c in range(10))
    write_idx(tmp_path / "idx", x, y, xt, yt)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(names))
    write_tree(tmp_path / "tree" / "train", x, y, names)
    write_tree(tmp_path / "tree" / "test", xt, yt, names)
    routes = [IdxData(dir=str(tmp_path / "idx"), verify=False, val_size=100, name="part"),
              NpzData(path=str(tmp_path / "a.npz"), val_size=100, name="part"),
              FolderData(dir=str(tmp_path / "tree"), val_size=100, name="part")]  # fmt: skip
    loaded = [load_arrays(r) for r in routes]
    for a in loaded:
        assert np.array_equal(a.x_train, x) and np.array_equal(a.y_train, y) and np.array_equal(a.x_test, xt)
        assert a.info.image == ImageShape(28, 28, 1, 10) and a.info.digest == loaded[0].info.digest != FASHION_MNIST_DIGEST
    assert loaded[1].info.class_names == loaded[2].info.class_names == names
    keys = {budget_key(EvalSpec(TrainConfig(), r, 0)) for r in routes}
    assert len(keys) == 1 and keys != {budget_key(EvalSpec(TrainConfig(), FashionMnistData(), 0))}  # one data, not Fashion-MNIST's
    cfg = TrainConfig(epochs=1, batch_size=64)
    results = [train_and_evaluate(_genome(), to_device(load(r, 0)), cfg, 0) for r in (routes[0], routes[2])]
    assert results[0].val_accuracy == results[1].val_accuracy and results[0].test_accuracy == results[1].test_accuracy


def _genome():
    from fmnas_jax.genome import Genome

    return Genome.parse("NC 4 3 relu;RC 8 3 relu;NC 4 3 relu;RC 8 3 relu;FL relu;")


def test_a_colour_dataset_of_another_size_trains_with_its_own_shape_and_classes(tmp_path):
    x, y = synthetic_32x32x3(400, 0)
    xt, yt = synthetic_32x32x3(100, 1)
    np.savez(tmp_path / "synthetic.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    data = load(NpzData(path=str(tmp_path / "synthetic.npz"), val_size=100), 0)
    assert data.image == ImageShape(32, 32, 3, 5) and data.class_names == ("0", "1", "2", "3", "4")
    # Normalised per channel: each channel's own mean and std over the training split.
    pixels = data.x_train.reshape(-1, 3) / 255.0
    assert np.allclose(data.mean, pixels.mean(0)) and np.allclose(data.std, pixels.std(0)) and len(set(data.mean)) == 3
    dd = to_device(data)
    assert dd.norm.shape == (2, 3)
    r = train_and_evaluate(_genome(), dd, TrainConfig(epochs=4, batch_size=32), 0, keep_variables=True)
    assert r.status == "FINISHED" and r.val_accuracy > 0.5  # 5 classes: chance is 0.2
    assert r.variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4) and r.variables["params"]["Dense_1"]["bias"].shape == (5,)
    from fmnas_jax.genome import count_params

    assert r.param_count == count_params(_genome(), data.image)
    # The checkpoint keeps the three channels' normalisation; predictions from it score what the trainer measured.
    from fmnas_jax.checkpoint import checkpoint_bytes, read_checkpoint
    from fmnas_jax.inference import predict_classes

    back = read_checkpoint(checkpoint_bytes(_genome(), r.variables, r.normalisation, data.image, data.class_names))
    assert back.normalisation == r.normalisation and len(back.normalisation[0]) == 3
    pred = predict_classes(_genome(), back.variables, back.normalisation, data.x_test)
    assert np.mean(pred == data.y_test) == pytest.approx(r.test_accuracy)


def test_an_archive_without_a_test_split_gets_a_stratified_one(tmp_path):
    x, y = synthetic_32x32x3(500, 0)
    np.savez(tmp_path / "train_only.npz", x_train=x, y_train=y)
    a = load_arrays(NpzData(path=str(tmp_path / "train_only.npz"), test_size=100, val_size=50))
    assert len(a.y_test) == 100 and len(a.y_train) == 400
    assert np.abs(np.bincount(a.y_test, minlength=5) / 100 - np.bincount(y, minlength=5) / 500).max() < 0.02
    by_default = load_arrays(NpzData(path=str(tmp_path / "train_only.npz"), val_size=50))  # test_size null: a fifth
    assert len(by_default.y_test) == 100 and np.array_equal(by_default.y_test, a.y_test)


def test_the_small_data_preset_fits_a_few_thousand_images_where_the_main_job_does_not(tmp_path):
    from hydra import compose, initialize_config_module

    from fmnas_jax.cli import to_app_config
    from fmnas_jax.jobs import on_data

    def prepared(*overrides: str):
        with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "data=npz", f"data.path={path}", "search_space=small_images"])
        return on_data(to_app_config(cfg))

    path = digits_npz(tmp_path / "digits.npz")  # 1,797 real images: a fifth carved out as test, 300 for validation
    with pytest.raises(DataError, match=r"data.val_size 5000 leaves fewer than 10 of its 1438 training images"):
        prepared("+experiment=hillclimb")
    app = prepared("+experiment=small_data")  # every rung's split and the retrain's fit the data
    assert app.search.strategy == "hillclimb" and app.search.fidelity.mode == "asha" and app.search_space.image == ImageShape(8, 8, 1, 10)
    assert app.data.n_train == 1438 - 300 and all(r.train_size < app.data.n_train for r in app.search.fidelity.rungs)


def _npz(tmp_path: Path, **arrays) -> DataConfig:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return NpzData(path=str(path), val_size=10, test_size=10)


X, Y = np.zeros((40, 8, 8), np.uint8), np.arange(40) % 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": X}, r"bad.npz lacks \['y_train'\]"),
        ({"x_train": X, "y_train": Y, "x_test": X}, r"lacks \['y_test'\]"),
        ({"x_train": X, "y_train": Y[:30]}, "40 images but labels of shape \\(30,\\)"),
        ({"x_train": X, "y_train": Y, "class_names": np.array(["a"])}, r"labels \[1\] are outside 0..0"),
        ({"x_train": X, "y_train": -Y}, r"labels \[-1\] are outside"),
        ({"x_train": X.astype(np.float32) / 255, "y_train": Y}, "images are float32: store them as uint8 pixel values 0..255"),
        ({"x_train": np.full((40, 8, 8), np.nan, np.float32), "y_train": Y}, "non-finite"),
        ({"x_train": X.astype(np.int32) + 300, "y_train": Y}, r"integer pixel values 0..255, got int32 in \[300..300\]"),
        ({"x_train": np.zeros((40, 8, 8, 2), np.uint8), "y_train": Y}, "1 or 3 channels"),
        ({"x_train": X, "y_train": np.where(np.arange(40) == 0, 2, Y)}, "have fewer than 2 training images"),
        ({"x_train": X, "y_train": np.zeros(40, int)}, "1 class: a classification needs at least 2"),
    ],
)
def test_a_bad_archive_is_refused_naming_the_file_and_the_problem(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_arrays(_npz(tmp_path, **arrays))


def test_bad_image_trees_are_refused_naming_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_arrays(FolderData(dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        load_arrays(FolderData(dir=str(tmp_path / "empty")))
    tree = tmp_path / "tree"
    for c, size in (("cat", 8), ("dog", 10)):
        (tree / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((size, size), 40 * i % 255, np.uint8)).save(tree / c / f"{i}.png")
    with pytest.raises(DataError, match=r"images of 2 sizes .* set data.image_size"):
        load_arrays(FolderData(dir=str(tree), val_size=10, test_size=10))
    resized = load_arrays(FolderData(dir=str(tree), val_size=10, test_size=10, image_size=(6, 6)))
    assert resized.info.image == ImageShape(6, 6, 1, 2) and resized.info.class_names == ("cat", "dog")
    (tree / "dog" / "broken.png").write_bytes(b"not a png")
    load_arrays.cache_clear()  # a process reads a tree once; read it again
    with pytest.raises(DataError, match=r"image .*broken.png could not be read"):
        load_arrays(FolderData(dir=str(tree), val_size=10, test_size=10, image_size=(6, 6)))
    (tree / "bird").mkdir()
    load_arrays.cache_clear()
    with pytest.raises(DataError, match=r"class folder .*bird holds no images"):
        load_arrays(FolderData(dir=str(tree), val_size=10, test_size=10, image_size=(6, 6)))


def test_a_split_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data.train_size 5000 is more than the 20 training images .*bad.npz has after data.val_size 10"):
        load_arrays(replace(_npz(tmp_path, x_train=X, y_train=Y), train_size=5000))


@pytest.mark.slow
def test_digits_and_a_colour_dataset_search_end_to_end_in_one_store(tmp_path):
    # Real 8 x 8 digits with a space whose kernels fit them; a synthetic 32 x 32 x 3 set of 5 classes; one store.
    digits = ["backend=inprocess", "data=npz", f"data.path={digits_npz(tmp_path / 'digits.npz')}", "data.val_size=300",
              "data.test_size=360", "data.train_size=null", "final.train_size=null", "search_space=small_images"]  # fmt: skip
    refused = job(tmp_path, "+experiment=smoke", *digits[:-1], check=False)  # the default space's kernel 7 cannot fit 8 x 8
    assert refused.returncode == 2 and "shrinks the data's 8x8 images to nothing" in refused.stderr and not runs(tmp_path)
    done = job(tmp_path, "+experiment=smoke", *digits)
    card = done.card()
    assert card["data"].startswith("digits: 8x8x1, 10 classes") and 0 < card["test_accuracy"] <= 1
    assert "| 9 | 9 | 36 |" in (done.files / "per_class.md").read_text()  # the test split carved out: 36 nines of 360
    x, y = synthetic_32x32x3(1500, 0)
    np.savez(tmp_path / "synthetic.npz", x_train=x, y_train=y, class_names=np.array(["r", "g", "b", "r+", "g+"]))
    colour = ["backend=inprocess", "data=npz", f"data.path={tmp_path / 'synthetic.npz'}", "data.val_size=200", "data.test_size=300",
              "data.train_size=null", "final.train_size=null", "search_space=small_images"]  # fmt: skip
    genome = "genome=NC 4 3 relu;RC 8 3 relu;NC 4 3 relu;RC 8 3 relu;FL relu;"
    for data in (digits, colour):  # the same genome on two datasets: two runs, and a rerun of each trains nothing
        job(tmp_path, "+experiment=train", genome, "trainer.epochs=1", *data[:-3], "search_space=small_images")
    alone = lambda: [r for r in runs(tmp_path, "evaluation", "FINISHED") if "mlflow.parentRunId" not in r.data.tags]  # noqa: E731
    trained = alone()  # the train job's runs (a search's evaluations are nested under it)
    assert len(trained) == 2 and len({r.data.params["data.data"] for r in trained}) == 2  # two data digests in the keys
    for data in (digits, colour):
        again = job(tmp_path, "+experiment=train", genome, "trainer.epochs=1", *data[:-3], "search_space=small_images")
        assert "nothing trained" in again.stdout
    assert len(alone()) == 2
    search = job(tmp_path, "+experiment=smoke", *colour)
    assert search.card()["data"].startswith("synthetic: 32x32x3, 5 classes (r, g, b, r+, ...)")


def test_the_bucket_backend_refuses_other_data_before_anything_runs(tmp_path):
    from fmnas_jax.config import AppConfig, BucketsBackend
    from fmnas_jax.jobs import on_data

    np.savez(tmp_path / "d.npz", x_train=np.zeros((40, 8, 8), np.uint8), y_train=np.arange(40) % 2)
    cfg = AppConfig(data=NpzData(path=str(tmp_path / "d.npz"), val_size=10, test_size=10), backend=BucketsBackend())
    with pytest.raises(DataError, match=r"backend=buckets trains 28x28x1, 10 classes data only; data d is 8x8x1, 2 classes"):
        on_data(cfg)
