"""Keys decide reuse: they must change exactly when a result would."""

from dataclasses import replace

from conftest import PAPER

from fmnas_jax.config import AppConfig
from fmnas_jax.data import DataConfig
from fmnas_jax.evaluator import budget_key, eval_key, search_key
from fmnas_jax.search import FitnessConfig, SearchConfig
from fmnas_jax.train import TrainConfig


def test_budget_key_follows_result_settings_only():
    base = budget_key(TrainConfig(), DataConfig(), 0)
    assert budget_key(TrainConfig(), DataConfig(), 0) == base
    assert budget_key(TrainConfig(save=True, eval_batch_size=500), DataConfig(verify=False), 0) == base  # no effect on results
    for changed in (budget_key(TrainConfig(epochs=3), DataConfig(), 0), budget_key(TrainConfig(learning_rate=1e-3), DataConfig(), 0),
                    budget_key(TrainConfig(), DataConfig(train_size=1000), 0), budget_key(TrainConfig(), DataConfig(), 1)):  # fmt: skip
        assert changed != base


def test_eval_key_is_genome_plus_budget():
    b = budget_key(TrainConfig(), DataConfig(), 0)
    assert eval_key(PAPER, b) == eval_key(PAPER, b)
    assert eval_key(PAPER, b) != eval_key(PAPER.replace("FL gelu", "FL relu"), b)
    assert eval_key(PAPER, b) != eval_key(PAPER, budget_key(TrainConfig(epochs=1), DataConfig(), 0))


def test_search_key_changes_with_what_shapes_the_path():
    app = AppConfig()
    assert search_key(app) == search_key(AppConfig())
    assert search_key(replace(app, search=SearchConfig(seed=1))) != search_key(app)
    assert search_key(replace(app, fitness=FitnessConfig(size_weight=0.05))) != search_key(app)
    assert search_key(replace(app, trainer=TrainConfig(epochs=2))) != search_key(app)
    assert search_key(replace(app, progress=False, workers=1)) == search_key(app)  # how it runs, not what it finds
