"""The composed step computes what one fused step of the Flax model computes, and its pieces are shared."""

import json
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnas_jax import Genome, pieces, runtime
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.model import GenomeCNN
from fmnas_jax.pieces import CACHE, _Cache
from fmnas_jax.programs import EvalPlan
from fmnas_jax.train import TrainConfig, compiled_programs, evaluate_split, init_state, to_device

GENOME = Genome.parse("NC 8 3 swish;RC 16 4 gelu;NC 4 2 tanh;RC 8 3 sigmoid;FL relu;")


@pytest.fixture(scope="module")
def dd():
    return to_device(synthetic_dataset(256, 96, 96, seed=1), eval_batch=64)


def _reference_step(genome, variables, x, y, lr, optimizer, weight_decay, smoothing):
    """One step of GenomeCNN with optax's own optimiser on the whole tree (what the fused step did)."""
    tx = {"adam": optax.adam(lr), "adamw": optax.adamw(lr, weight_decay=weight_decay), "sgd": optax.sgd(lr, 0.9, nesterov=True)}[optimizer]
    model = GenomeCNN(genome)

    def loss_fn(params):
        logits, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        targets = optax.smooth_labels(jax.nn.one_hot(y, 10), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean(), (logits, upd["batch_stats"])

    params = variables["params"]
    opt = tx.init(params)
    for _ in range(2):  # two steps: the optimiser state matters from the second on
        (_, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        variables = {"params": params, "batch_stats": stats}
    return variables, logits


@pytest.mark.parametrize(("optimizer", "weight_decay", "smoothing"), [("adam", 0.0, 0.0), ("adamw", 0.1, 0.1), ("sgd", 0.0, 0.0)])
def test_the_composed_step_equals_a_fused_step_of_the_flax_model(dd, optimizer, weight_decay, smoothing):
    cfg = TrainConfig(batch_size=32, optimizer=optimizer, weight_decay=weight_decay, label_smoothing=smoothing)
    programs = compiled_programs(GENOME, cfg, dd)
    state = init_state(GENOME, cfg, 0)
    expected_start = jax.tree_util.tree_map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    perm, key, lr = jnp.arange(dd.x_train.shape[0]), jax.random.key(0), 1e-2
    for _ in range(2):  # the same batch twice (i = 0); acc keeps the second step's sums
        state, acc = programs.step(state, jnp.zeros(2), dd.x_train, dd.y_train, dd.norm, perm, key, np.float32(lr), 0, 0)
    x = (dd.x_train[:32].astype(jnp.float32) / 255 - dd.norm[0]) / dd.norm[1]
    expected, logits = _reference_step(GENOME, expected_start, x, dd.y_train[:32], lr, optimizer, weight_decay, smoothing)
    got = {"params": state.params, "batch_stats": state.batch_stats}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5), got, expected)
    plain_loss = optax.softmax_cross_entropy_with_integer_labels(logits, dd.y_train[:32]).sum()  # reported unsmoothed
    assert float(acc[1]) == float((logits.argmax(-1) == dd.y_train[:32]).sum())
    assert float(acc[0]) == pytest.approx(float(plain_loss), rel=1e-4)


def test_weight_decay_has_an_effect_and_is_a_run_time_value(dd):
    before = CACHE.compiles
    runs = {}
    for wd in (0.0, 0.5):
        cfg = TrainConfig(batch_size=32, optimizer="adamw", weight_decay=wd)
        programs = compiled_programs(GENOME, cfg, dd)
        state, acc = init_state(GENOME, cfg, 0), jnp.zeros(2)
        for i in range(3):
            state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, jnp.arange(dd.x_train.shape[0]), jax.random.key(0),
                                       np.float32(1e-2), 0, i)  # fmt: skip
        runs[wd] = np.abs(np.asarray(state.params["Conv_1"]["kernel"])).sum()
        if wd == 0.0:
            before = CACHE.compiles
    assert CACHE.compiles == before  # another decay: no new program
    assert runs[0.5] < runs[0.0]  # decay shrinks the weights


def test_eval_pieces_score_like_the_flax_model(dd):
    cfg = TrainConfig(batch_size=32)
    state = init_state(GENOME, cfg, 3)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    programs = compiled_programs(GENOME, cfg, dd)
    loss, accuracy = evaluate_split(programs, variables, dd, dd.test_range)
    x = (dd.x_eval[96:192].astype(jnp.float32) / 255 - dd.norm[0]) / dd.norm[1]
    logits = GenomeCNN(GENOME).apply(variables, x, train=False)
    assert accuracy == pytest.approx(float((logits.argmax(-1) == dd.y_eval[96:192]).mean()), abs=1e-6)
    assert loss == pytest.approx(float(optax.softmax_cross_entropy_with_integer_labels(logits, dd.y_eval[96:192]).mean()), rel=1e-4)
    images = np.asarray(dd.x_eval[96:128])
    classes = EvalPlan(GENOME, 32, dd.device).classes(variables, jnp.asarray(images), dd.norm)
    assert np.array_equal(np.asarray(classes), np.asarray(logits.argmax(-1))[:32])


def test_a_piece_asked_for_by_several_threads_compiles_once():
    cache, calls, gate = _Cache(8), [], threading.Event()

    def build():
        calls.append(1)
        gate.wait(5)
        return "program"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(("k",), build))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and [r[0] for r in results] == ["program"] * 4
    assert sorted(r[1] > 0 for r in results) == [False, False, False, True]  # one caller paid the compile


def test_a_failed_compile_is_not_cached():
    cache = _Cache(8)
    with pytest.raises(ValueError):
        cache.get(("k",), lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert cache.get(("k",), lambda: "ok")[0] == "ok"


def test_the_cache_is_bounded():
    cache = _Cache(3)
    for i in range(5):
        cache.get((i,), lambda i=i: i)
    assert len(cache._entries) == 3 and cache.get((0,), lambda: "rebuilt")[0] == "rebuilt"


# A process that trains one genome on synthetic data with its caches in argv[1], and says what it saw.
TRAIN_ONCE = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from fmnas_jax.runtime import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
from fmnas_jax import Genome
from fmnas_jax.data import synthetic_dataset
from fmnas_jax.train import TrainConfig, to_device, train_and_evaluate
dd = to_device(synthetic_dataset(256, 96, 96, seed=1), eval_batch=64)
r = train_and_evaluate(Genome.parse(sys.argv[2]), dd, TrainConfig(batch_size=64, epochs=1), seed=0)
print(json.dumps({"status": r.status, "history": r.history, "test": r.test_accuracy, "loaded": r.cache_hits}))
"""


def test_the_pieces_one_process_compiled_the_next_one_loads_and_trains_the_same(tmp_path):
    genome, folder = "NC 4 3 gelu;RC 8 2 relu;NC 4 3 tanh;RC 8 2 swish;FL sigmoid;", tmp_path / "pieces"

    def train() -> dict:
        out = subprocess.run([sys.executable, "-c", TRAIN_ONCE, str(tmp_path), genome], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    first = train()
    kept = sorted(folder.rglob("*.xla"))
    assert first["status"] == "FINISHED" and first["loaded"] == 0 and len(kept) > 10  # compiled, and kept
    second = train()
    assert second["loaded"] == len(kept) and sorted(folder.rglob("*.xla")) == kept  # loaded, not traced
    assert (second["history"], second["test"]) == (first["history"], first["test"])  # the same training, to the last bit


def test_a_piece_jax_loaded_from_its_own_cache_is_not_kept(tmp_path, monkeypatch):
    """Such an executable serializes without its machine code on CPU: kept, the next process would fail to run it."""
    key, device = ("pool", (5, 5), 2, 8), jax.devices()[0]
    monkeypatch.setitem(runtime._PIECES, "dir", None)
    CACHE.clear()
    pieces.piece(key, device)  # compiled (and written to JAX's persistent cache), or read from it
    monkeypatch.setitem(runtime._PIECES, "dir", tmp_path)
    CACHE.clear()
    hits = runtime.cache_hits()
    program, _ = pieces.piece(key, device)
    assert runtime.cache_hits() == hits + 1 and not list(tmp_path.rglob("*.xla"))  # JAX's cache served it: not kept
    x = jnp.arange(8 * 5 * 5 * 2, dtype=jnp.float32).reshape(8, 5, 5, 2)
    assert np.allclose(program(x), x.mean(axis=(1, 2)))
    CACHE.clear()


def test_a_damaged_kept_piece_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setitem(runtime._PIECES, "dir", tmp_path)
    key, device = ("pool", (7, 7), 3, 16), jax.devices()[0]
    path = pieces._path(key, device)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an executable")
    CACHE.clear()
    program, _ = pieces.piece(key, device)
    x = jnp.arange(16 * 7 * 7 * 3, dtype=jnp.float32).reshape(16, 7, 7, 3)
    assert np.allclose(program(x), x.mean(axis=(1, 2)))
    assert not path.exists() or path.read_bytes() != b"not an executable"  # replaced (or left to JAX's own cache)
    CACHE.clear()


def test_a_new_fingerprint_removes_the_folders_of_old_ones_left_unused(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setitem(runtime._PIECES, "dir", tmp_path)
    old, recent = tmp_path / "0123456789abcdef", tmp_path / "fedcba9876543210"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "x.xla").write_bytes(b"")
    stale = time.time() - (pieces.STALE_DAYS + 1) * 86400
    os.utime(old, (stale, stale))
    # Kept even if JAX's own cache served it (this test only looks at folders; the file is never loaded).
    monkeypatch.setattr(runtime, "jax_cache_hits_here", lambda: 0)
    key = ("pool", (3, 4), 5, 4)
    CACHE.clear()
    pieces.piece(key, jax.devices()[0])  # the first piece of this fingerprint's new folder
    assert pieces._path(key, jax.devices()[0]).exists()
    assert not old.exists() and (recent / "x.xla").exists()
    CACHE.clear()


def test_a_piece_compiled_under_other_xla_flags_is_kept_apart(tmp_path, monkeypatch):
    monkeypatch.setitem(runtime._PIECES, "dir", tmp_path)
    key, device = ("pool", (14, 14), 4, 64), jax.devices()[0]
    here = pieces._path(key, device)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    pieces._fingerprint.cache_clear()
    try:
        elsewhere = pieces._path(key, device)
    finally:
        monkeypatch.undo()
        pieces._fingerprint.cache_clear()
    assert here is not None and elsewhere is not None and here.parent != elsewhere.parent and here.name == elsewhere.name


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_the_host_built_optimiser_state_is_optax_own(optimizer):
    from fmnas_jax.model import init_variables
    from fmnas_jax.ops import init_opt_state, moments

    params = init_variables(GENOME, 0)["params"]
    ours = init_opt_state(params, optimizer, 0.1)
    for module, p in params.items():
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours[module],
                               moments(optimizer).init(p))  # fmt: skip


def test_the_fused_plan_trains_like_the_composed_one(dd):
    from fmnas_jax.train import train_and_evaluate

    cfg = TrainConfig(batch_size=32, epochs=2, label_smoothing=0.1, augment_flip=True)
    composed = train_and_evaluate(GENOME, dd, cfg, seed=5)
    fused = train_and_evaluate(GENOME, dd, cfg, seed=5, fused=True)
    assert fused.status == composed.status == "FINISHED" and fused.compile_seconds > 0
    for k in ("train_loss", "val_loss", "val_accuracy", "test_accuracy"):
        assert getattr(fused, k) == pytest.approx(getattr(composed, k), rel=1e-3, abs=2e-3), k  # float rounding only
