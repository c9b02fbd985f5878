"""The parallel evaluation paths compute what one process computes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_real_data

from fmnas_jax.data import DataConfig, load
from fmnas_jax.genome import SearchSpace, sample_population
from fmnas_jax.parallel import BucketPool, WorkerPool
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate

pytestmark = needs_real_data
DATA = DataConfig(train_size=1000, val_size=500)
TRAINER = TrainConfig(epochs=1, batch_size=100)


def _genomes(n=3):
    return sample_population(SearchSpace(filters=(4, 8), kernel_sizes=(1, 3)), n, np.random.default_rng(0))


def test_bucket_pool_matches_in_process():
    """batching=buckets: genomes of different shapes in one masked bucket, results as if trained alone."""
    import jax

    genomes = _genomes(3)
    dd = to_device(load(DATA, 0), TRAINER.eval_batch_size)
    solo = {str(g): train_and_evaluate(g, dd, TRAINER, 0) for g in genomes}
    pool = BucketPool(jax.devices()[0], max_models=3, max_waste=100)  # everything into one bucket
    got = dict((str(g), r) for g, r in pool.map_unordered(genomes, TRAINER, DATA, 0))
    assert set(got) == set(solo)
    for k, r in got.items():
        assert r.status == "FINISHED"
        assert r.history["train_loss"] == pytest.approx(solo[k].history["train_loss"], rel=2e-4)
        assert r.val_accuracy == pytest.approx(solo[k].val_accuracy, abs=2e-3)


def test_worker_pool_matches_in_process(tmp_path):
    genomes = _genomes()
    dd = to_device(load(DATA, 0), TRAINER.eval_batch_size)
    solo = {str(g): train_and_evaluate(g, dd, TRAINER, 0) for g in genomes}
    pool = WorkerPool(2, str(tmp_path / "cache"))
    try:
        got = dict((str(g), r) for g, r in pool.map_unordered(genomes, TRAINER, DATA, 0))
    finally:
        pool.close()
    assert set(got) == set(solo)
    for k, r in got.items():
        assert r.status == "FINISHED"
        assert r.history["train_loss"] == pytest.approx(solo[k].history["train_loss"], rel=1e-5)
        assert r.val_accuracy == pytest.approx(solo[k].val_accuracy, abs=2e-3)  # a near-tie may flip one image


CHILD = r"""
import json, sys
import numpy as np, jax
from fmnas_jax.data import DataConfig, load
from fmnas_jax.genome import SearchSpace, sample_population
from fmnas_jax.parallel import DevicePool
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate
assert jax.device_count() == 2, jax.devices()
genomes = sample_population(SearchSpace(filters=(4, 8), kernel_sizes=(1, 3)), 4, np.random.default_rng(0))
data, trainer = DataConfig(train_size=1000, val_size=500), TrainConfig(epochs=1, batch_size=100)
pool = DevicePool(jax.devices())
split = {str(g): (r.history, r.test_accuracy) for g, r in pool.map_unordered(genomes, trainer, data, 0)}
used = sorted({d.id for d in pool.devices})
pool.close()
dd = to_device(load(data, 0), trainer.eval_batch_size)
one = {str(g): (r.history, r.test_accuracy) for g in genomes for r in [train_and_evaluate(g, dd, trainer, 0)]}
print(json.dumps({"same": split == one, "devices": used}))
"""


def test_population_split_across_two_devices_matches_one_device():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"same": True, "devices": [0, 1]}


def test_a_stopped_device_pool_ends_evaluations_at_the_next_epoch():
    """What an interrupted search does to its GPU evaluations: they end FAILED after at most one epoch."""
    import jax

    from fmnas_jax.parallel import DevicePool

    pool = DevicePool(jax.devices()[:1])
    pool.stop()
    ((_, r),) = list(pool.map_unordered(_genomes(1), TrainConfig(epochs=50, batch_size=100), DATA, 0))
    pool.close()
    assert r.status == "FAILED" and "interrupted" in r.reason and "after epoch 1" in r.reason
