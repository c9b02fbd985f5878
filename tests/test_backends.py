"""Every evaluation path computes what one process computes, through the one Backend interface (synthetic data)."""

import json
import multiprocessing as mp
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmnas_jax.backends import Buckets, DataCache, Devices, EvalSpec, InProcess, Workers, choose_backend, opened, single_threaded_xla
from fmnas_jax.backends.base import SINGLE_CORE_XLA
from fmnas_jax.caches import cache_home
from fmnas_jax.data import FashionMnistData, synthetic_load
from fmnas_jax.genome import SearchSpace, sample_population
from fmnas_jax.train import TrainConfig

SPEC = EvalSpec(TrainConfig(epochs=1, batch_size=64), FashionMnistData(train_size=512, val_size=200), 0)


def _genomes(n=3):
    return sample_population(SearchSpace(filters=(4, 8), kernel_sizes=(1, 3)), n, np.random.default_rng(0))


@pytest.fixture(scope="module")
def solo():
    return dict(InProcess(synthetic_load).evaluate(_genomes(), SPEC))


def _check(got, solo, rel):
    assert set(got) == set(solo)
    for g, r in got.items():
        assert r.status == "FINISHED", r.reason
        assert r.history["train_loss"] == pytest.approx(solo[g].history["train_loss"], rel=rel)
        assert r.val_accuracy == pytest.approx(solo[g].val_accuracy, abs=1e-2)  # a near-tie may flip an image


def test_in_process_streams_epochs_and_is_deterministic(solo):
    seen = []
    got = dict(InProcess(synthetic_load).evaluate(_genomes(), SPEC, on_epoch=lambda g, e, row: seen.append((g, e))))
    assert [e for _, e in seen] == [1, 1, 1] and [g for g, _ in seen] == _genomes()
    assert {g: r.history for g, r in got.items()} == {g: r.history for g, r in solo.items()}


def test_worker_processes_match_in_process(solo, tmp_path):
    before = set(mp.active_children())
    with opened(Workers(2, str(cache_home() / "jax"), synthetic_load)) as backend:  # the CLI's cache
        assert backend.parallelism == 2 and not backend.streams_epochs
        assert set(mp.active_children()) == before  # started at the first evaluation, not before
        got = dict(backend.evaluate(_genomes(), SPEC))
        assert len(set(mp.active_children()) - before) == 2
    _check(got, solo, rel=1e-5)
    with opened(Workers(2, None, synthetic_load)):  # a search that trains nothing (a rerun) starts no process
        pass
    assert set(mp.active_children()) == before


@pytest.mark.slow  # compiles vmapped buckets: 6-11 s
def test_masked_buckets_match_in_process(solo):
    backend = Buckets(jax.devices()[0], max_models=3, max_waste=100, loader=synthetic_load)  # everything in one bucket
    _check(dict(backend.evaluate(_genomes(), SPEC)), solo, rel=2e-4)


def test_a_failure_is_a_result_not_an_exception():
    too_big = EvalSpec(TrainConfig(epochs=1, batch_size=4096), SPEC.data, 0)  # more than the 512 images
    for backend in (InProcess(synthetic_load), Devices(jax.devices()[:1], loader=synthetic_load)):
        ((_, r),) = list(backend.evaluate(_genomes(1), too_big))
        backend.close()
        assert r.status == "FAILED" and "batch_size 4096 exceeds the 512 training images" in r.reason


def test_a_stopped_device_pool_ends_evaluations_at_the_next_epoch():
    """What an interrupted search does to its GPU evaluations: they end FAILED after at most one epoch."""
    backend = Devices(jax.devices()[:1], loader=synthetic_load)
    backend.stop()
    ((_, r),) = list(backend.evaluate(_genomes(1), EvalSpec(TrainConfig(epochs=50, batch_size=64), SPEC.data, 0)))
    backend.close()
    assert r.status == "FAILED" and "interrupted" in r.reason and "after epoch 1" in r.reason


def test_the_data_cache_loads_once_per_split():
    calls = []

    def loader(cfg, seed):
        calls.append((cfg, seed))
        return synthetic_load(cfg, seed)

    cache = DataCache(loader)
    a, b = cache.get(SPEC), cache.get(EvalSpec(TrainConfig(epochs=5), SPEC.data, 0))  # another budget, same split
    assert a is b and len(calls) == 1
    cache.get(EvalSpec(SPEC.trainer, FashionMnistData(train_size=256, val_size=200), 0))
    assert len(calls) == 2


def test_choose_backend_follows_the_settings(tmp_path):
    from fmnas_jax.config import AutoBackend, BucketsBackend, DevicesBackend, InProcessBackend

    assert isinstance(choose_backend(InProcessBackend(), loader=synthetic_load), InProcess)
    assert isinstance(choose_backend(BucketsBackend(), loader=synthetic_load), Buckets)
    devices = choose_backend(DevicesBackend(per_device=3), loader=synthetic_load)
    assert isinstance(devices, Devices) and devices.parallelism == 3 * len(jax.devices())
    devices.close()
    auto = choose_backend(AutoBackend(), cache_dir=str(tmp_path), loader=synthetic_load)
    try:
        expected = Workers if (os.cpu_count() or 1) > 1 and len(jax.devices()) == 1 else (Devices, InProcess)
        assert isinstance(auto, expected)
    finally:
        auto.close()


CHILD = r"""
import json
import numpy as np, jax
from fmnas_jax.backends import Devices, EvalSpec, InProcess
from fmnas_jax.data import FashionMnistData, synthetic_load
from fmnas_jax.genome import SearchSpace, sample_population
from fmnas_jax.train import TrainConfig
assert jax.device_count() == 2, jax.devices()
genomes = sample_population(SearchSpace(filters=(4, 8), kernel_sizes=(1, 3)), 4, np.random.default_rng(0))
spec = EvalSpec(TrainConfig(epochs=1, batch_size=64), FashionMnistData(train_size=512, val_size=200), 0)
pool = Devices(jax.devices(), loader=synthetic_load)
split = {str(g): (r.history, r.test_accuracy) for g, r in pool.evaluate(genomes, spec)}
used = sorted({d.id for d in pool.devices})
pool.close()
one = {str(g): (r.history, r.test_accuracy) for g, r in InProcess(synthetic_load).evaluate(genomes, spec)}
print(json.dumps({"same": split == one, "devices": used}))
"""


@pytest.mark.slow  # a fresh process with two CPU devices
def test_population_split_across_two_devices_matches_one_device():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"same": True, "devices": [0, 1]}


def test_single_core_xla_flags_are_added_once_to_what_the_process_has():
    assert single_threaded_xla({}) == {"XLA_FLAGS": SINGLE_CORE_XLA}
    mine = single_threaded_xla({"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"})
    assert mine == {"XLA_FLAGS": f"--xla_cpu_enable_fast_math=true {SINGLE_CORE_XLA}"}
    assert single_threaded_xla(mine) == mine  # a worker of a single-core process compiles what its parent compiles
