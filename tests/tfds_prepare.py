"""Prepare TFDS's `fashion_mnist` in a data_dir from the first 1,000 training and 200 test images of local IDX files
(and the same images as `fashion_mnist_head`), with TFDS's own builder and writer.

TensorFlow Datasets' FashionMNIST builder normally downloads four .gz files; here its split
generator is pointed at the decompressed local copies instead, and everything else (features,
PNG encoding, the array_record files, dataset_info.json) is TFDS's own. Needs TensorFlow (TFDS
writes images with it): `pip install -e '.[tfds-prepare]'`. Run as a script, so that TensorFlow
is never imported into the test process:

    python tests/tfds_prepare.py IDX_DIR DATA_DIR
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification.mnist import FashionMNIST

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def prepare(idx_dir: Path, data_dir: Path) -> Path:
    raw = data_dir / "idx"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in STEMS:  # what TFDS's download_and_extract would have left: the decompressed files
        gz = idx_dir / f"{stem}.gz"
        (raw / stem).write_bytes(gzip.decompress(gz.read_bytes()) if gz.exists() else (idx_dir / stem).read_bytes())

    def builder(dataset: str, train: int, test: int) -> tfds.core.DatasetBuilder:
        class Local(FashionMNIST, skip_registration=True):
            name = dataset

            def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> list:
                def split(name: str, prefix: str, n: int) -> tfds.core.SplitGenerator:
                    paths = {"data_path": str(raw / f"{prefix}-images-idx3-ubyte"), "label_path": str(raw / f"{prefix}-labels-idx1-ubyte")}
                    return tfds.core.SplitGenerator(name=name, gen_kwargs={"num_examples": n, **paths})  # the files' first n

                return [split(tfds.Split.TRAIN, "train", train), split(tfds.Split.TEST, "t10k", test)]

        return Local(data_dir=str(data_dir), file_format="array_record")

    # fashion_mnist (read back in the files' order), and the same images under another name (for the route any other
    # TFDS dataset takes: its own order, no sha256).
    for b in (builder("fashion_mnist", 1000, 200), builder("fashion_mnist_head", 1000, 200)):
        b.download_and_prepare()
    return data_dir


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1]), Path(sys.argv[2])))
