"""Every experiment composes with real Hydra, and bad values fail before anything runs."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fmnas_jax.cli import quote_values, to_app_config
from fmnas_jax.config import ConfigError, realize, schema
from fmnas_jax.genome import SearchSpace

CONF = Path(__file__).parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_module("fmnas_jax.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_there_are_experiments():
    assert {"smoke", "train", "hillclimb", "paper"} <= set(EXPERIMENTS)


REQUIRED = {"predict": ["run_id=0123456789abcdef"]}  # what an experiment's command must add


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    app = to_app_config(_compose(f"+experiment={name}", *REQUIRED.get(name, [])))
    assert app.search.population_size >= 1


def test_predict_needs_a_run_or_a_checkpoint():
    with pytest.raises(ConfigError, match="run_id=<MLflow run id> or checkpoint="):
        to_app_config(_compose("+experiment=predict"))


def test_every_config_file_starts_with_its_command():
    for path in CONF.rglob("*.yaml"):
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
        assert lines[0].startswith("# python -m fmnas_jax"), path


def test_experiment_values_land_in_the_typed_config():
    app = to_app_config(_compose("+experiment=paper"))
    assert app.search.strategy == "table" and app.search.population_size == 120
    assert app.fitness.metric == "test_accuracy" and app.fitness.paper_reproduction
    train = to_app_config(_compose("+experiment=train"))
    assert train.mode == "train" and train.trainer.save and train.trainer.epochs == 10


def test_command_line_overrides_win():
    app = to_app_config(
        _compose(
            "+experiment=hillclimb",
            "search=table",
            "trainer.epochs=3",
            "data.train_size=null",
            "fitness.size_weight=0.05",
            "seed=7",
            "search_space=small",
        )
    )
    assert app.search.strategy == "table" and app.trainer.epochs == 3 and app.data.train_size is None
    assert app.fitness.size_weight == 0.05 and app.seed == 7 and app.search_space.filters == (4, 8, 16, 32)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.epochs=-1", "trainer.epochs -1"),
        ("search.population_size=0", "search.population_size 0"),
        ("search.population_size=-4", "search.population_size -4"),
        ("fitness.size_weight=nan", "fitness.size_weight must be a finite number"),
        ("fitness.metric=test_accuracy", "paper_reproduction"),
        ("trainer.learning_rate=0", "trainer.learning_rate 0.0"),
        ("data.val_size=3", "data.val_size 3"),
        ("search_space.kernel_sizes=[0,3]", "kernel sizes [0]"),
        ("search_space.activations=[relu,elu]", "['elu']"),
        (("backend=buckets", "backend.bucket_waste=0.5"), "bucket_waste 0.5"),
        ("backend.per_device=0", "backend.per_device 0 must be >= 1"),
        (("backend=ray", "backend.num_cpus=0"), "backend.num_cpus 0 and backend.num_gpus 0 must be >= 0, and not both 0"),
        (("backend=ray", "backend.num_gpus=-1"), "backend.num_gpus -1 must be >= 0"),
        (("backend=ray", "backend.max_in_flight=-2"), "backend.max_in_flight -2"),
        ("search.final_share=1.0", "search.final_share 1.0 must be between 0 and 1"),
        ("registry.model_name=team/winner", "registry.model_name 'team/winner' is not a name MLflow can register"),
        ("registry.model_name=..winner", "registry.model_name '..winner' is not a name MLflow can register"),
        ("registry.model_name='a:b'", "must not contain '/', ':' or a single quote"),
        ('registry.model_name="it\'s"', 'registry.model_name "it\'s" is not a name MLflow can register'),
        (("search=optuna", "search.sampler=cmaes"), "search.sampler 'cmaes' is not one of ['tpe', 'nsga2', 'random']"),
        ("search.time_budget=null", "search.budget and search.time_budget are both null"),
        ("search.min_gain=-0.01", "search.min_gain -0.01 must be >= 0 and < 1"),
        # a "tiny" search whose rungs cost more than its own budget: refused, naming the settings
        ("data.train_size=2000", "search.fidelity.rungs[1] trains 2 x 10,000 = 20,000 images, not fewer than the search's own budget"),
        (
            "search.fidelity.rungs=[{epochs: 2, train_size: 4000}, {epochs: 1, train_size: 4000}]",
            "search.fidelity.rungs[0] trains 2 x 4,000 = 8,000 images, not fewer than search.fidelity.rungs[1]'s 1 x 4,000",
        ),
    ],
)
def test_bad_values_are_refused_with_their_name(override, fragment):
    with pytest.raises(ValueError) as info:
        to_app_config(_compose("+experiment=hillclimb", *([override] if isinstance(override, str) else override)))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "search.confirm=2",
        "search.confirm_seeds=2",
        "search.explore=0.1",
        "search.min_gain_rungs=[0.02]",
        "search.radius=2",
        "workers=1",
        "batching=buckets",
        "bucket_size=8",
        "bucket_waste=2",
    ],
)
def test_retired_keys_get_hydras_no_such_key_error(key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key.split('=')[0]}'"):
        _compose("+experiment=hillclimb", key)


def test_the_main_job_climbs_beyond_noise_and_its_strategy_swaps_cleanly():
    """+experiment=hillclimb runs search=hillclimb with search.min_gain=0.008; search.min_gain=0 is the climb of any
    gain; the other strategies take its place without its climb-only setting (their schemas have no min_gain)."""
    main = to_app_config(_compose("+experiment=hillclimb"))
    assert (main.search.strategy, main.search.min_gain, main.search.fidelity.mode) == ("hillclimb", 0.008, "asha")
    assert to_app_config(_compose("+experiment=hillclimb", "search.min_gain=0")).search.min_gain == 0.0
    assert to_app_config(_compose("search=hillclimb")).search.min_gain == 0.0  # the group's default stays
    for strategy in ("random", "evolution", "optuna", "table"):
        swapped = to_app_config(_compose("+experiment=hillclimb", f"search={strategy}"))
        assert swapped.search.strategy == strategy and not hasattr(swapped.search, "min_gain")
        assert swapped.search.fidelity.mode == "asha" and swapped.search.population_size == 18


def test_each_backend_takes_its_own_settings_only():
    from hydra.errors import ConfigCompositionException

    from fmnas_jax.config import BACKEND_CONFIGS

    for kind, cls in BACKEND_CONFIGS.items():  # every conf/backend/<kind>.yaml holds exactly its class's settings
        backend = OmegaConf.to_container(_compose(f"backend={kind}"), resolve=True)["backend"]
        assert set(backend) == {f.name for f in dataclasses.fields(cls)}, kind
        assert type(to_app_config(_compose(f"backend={kind}")).backend) is cls
    with pytest.raises(ConfigCompositionException, match="bucket_size"):  # another backend's setting: Hydra says so at once
        _compose("backend=workers", "backend.bucket_size=8")
    with pytest.raises(ConfigError, match="choose the backend with backend=ray"):  # a kind set on another kind's settings
        to_app_config(_compose("backend.kind=ray"))


def test_each_data_source_takes_its_own_settings_only():
    from hydra.errors import ConfigCompositionException

    from fmnas_jax.data import DATA_CONFIGS

    required = {"idx": ["data.dir=/data/kmnist"], "npz": ["data.path=mine.npz"], "folder": ["data.dir=photos"]}
    for source, cls in DATA_CONFIGS.items():  # every conf/data/<source>.yaml holds exactly its class's settings
        data = OmegaConf.to_container(_compose(f"data={source}"))["data"]
        assert set(data) == {f.name for f in dataclasses.fields(cls)}, source
        app = to_app_config(_compose(f"data={source}", *required.get(source, [])))
        assert type(app.data) is cls and app.data.source == source
    with pytest.raises(ConfigCompositionException, match="data.path"):  # another source's setting: Hydra says so at once
        _compose("data=idx", "data.path=mine.npz")
    with pytest.raises(ConfigError, match="choose the data source with data=npz"):  # a source set on another's settings
        to_app_config(_compose("data.source=npz"))
    with pytest.raises(ConfigError, match="data.dir"):  # a source's own required setting, named
        to_app_config(_compose("data=folder"))


def test_the_ray_backend_settings_land_in_the_typed_config():
    app = to_app_config(_compose("+experiment=hillclimb", "backend=ray", "backend.address=auto", "backend.num_gpus=0.25"))
    b = app.backend
    assert (b.kind, b.address, b.num_cpus, b.num_gpus, b.max_in_flight, b.max_retries) == ("ray", "auto", 1.0, 0.25, 0, 3)


def test_bad_genome_in_train_mode_is_refused():
    (arg,) = quote_values(["genome=NC 4 5 sigmoid;RC 64 8 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"])  # as the shell passes it
    with pytest.raises(ValueError, match=r"kernel size 8 in layer 2 \(RC\)"):
        to_app_config(_compose("+experiment=train", arg))


def test_genome_values_are_quoted_for_hydra():
    paper = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"
    assert quote_values(["x", f"genome={paper}", "seed=1"]) == ["x", f"genome='{paper}'", "seed=1"]
    assert quote_values([f"genome='{paper}'"]) == [f"genome='{paper}'"]  # already quoted: untouched
    assert quote_values([f"genome={paper},{paper}"]) == [f"genome='{paper}','{paper}'"]  # a sweep
    assert to_app_config(_compose("+experiment=train", *quote_values([f"genome={paper}"]))).genome == paper


def test_unknown_keys_are_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="epoch"):
        _compose("trainer.epoch=3")
    with pytest.raises(ConfigCompositionException, match="anneal"):
        _compose("search=anneal")
    cfg = OmegaConf.to_container(_compose("+experiment=smoke"), resolve=True)
    cfg["search"]["populaton_size"] = 3
    with pytest.raises(ConfigError, match="populaton_size"):
        to_app_config(OmegaConf.create(cfg))


def test_each_strategy_takes_its_own_settings_only():
    from hydra.errors import ConfigCompositionException

    from fmnas_jax.search import STRATEGY_CONFIGS, EvolutionConfig, RandomConfig

    for name, cls in STRATEGY_CONFIGS.items():  # every conf/search/<name>.yaml holds exactly its class's settings
        search = OmegaConf.to_container(_compose(f"search={name}"), resolve=True)["search"]
        assert set(search) == {f.name for f in dataclasses.fields(cls)}, name
        assert type(to_app_config(_compose(f"search={name}")).search) is cls
    app = to_app_config(_compose("+experiment=hillclimb", "search=evolution", "search.tournament_size=7"))
    assert isinstance(app.search, EvolutionConfig) and app.search.tournament_size == 7 and app.search.fidelity.mode == "asha"
    with pytest.raises(ConfigCompositionException, match="move"):  # another strategy's setting: Hydra says so at once
        _compose("search=random", "search.move=steepest")
    cfg = OmegaConf.to_container(_compose("search=random"), resolve=True)
    cfg["search"]["max_restarts"] = 1000  # and so does a plain dict, checked against the same schema
    with pytest.raises(ConfigError, match=r"Key 'max_restarts' not in 'RandomConfigSchema'; full_key: search.max_restarts"):
        to_app_config(OmegaConf.create(cfg))
    with pytest.raises(ConfigError, match="search.strategy 'anneal' is not one of"):
        to_app_config(OmegaConf.create({"search": {"strategy": "anneal"}}))
    with pytest.raises(ConfigError, match="choose the strategy with search=random"):  # the strategy's name on another's settings
        to_app_config(_compose("search.strategy=random"))
    assert RandomConfig().strategy == "random"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("fitness.size_weight=heavy", "Value 'heavy' of type 'str' could not be converted to Float"),
        ("search.budget=2.5", "Value '2.5' of type 'float' could not be converted to Integer"),
        ("trainer.augment_flip=sometimes", "Value 'sometimes' is not a valid bool"),
        ("search_space.kernel_sizes=[3,x]", "Value 'x' of type 'str' could not be converted to Integer"),
    ],
)
def test_wrong_types_fail_while_hydra_composes(override, fragment):
    """The schemas in Hydra's ConfigStore type every key: a wrong type never reaches the job, the message names the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        _compose("+experiment=hillclimb", override)
    cause = str(info.value.__cause__)
    assert fragment in cause and f"full_key: {override.split('=')[0]}" in cause, cause


def test_plain_dicts_are_checked_against_the_same_schemas():
    with pytest.raises(ConfigError, match="could not be converted to Integer; full_key: search.seed"):
        to_app_config(OmegaConf.create({"search": {"seed": True}}))
    with pytest.raises(ConfigError, match="full_key: search.budget"):
        to_app_config(OmegaConf.create({"search": {"budget": 2.5}}))


def test_schemas_mirror_the_frozen_settings():
    from fmnas_jax.config import AppConfig
    from fmnas_jax.search import STRATEGY_CONFIGS, HillClimbConfig, SearchConfig

    for cls in (AppConfig, *STRATEGY_CONFIGS.values()):  # the same fields, generated from the frozen class
        assert [f.name for f in dataclasses.fields(schema(cls))] == [f.name for f in dataclasses.fields(cls) if f.init], cls
    for cls in STRATEGY_CONFIGS.values():  # and the same defaults
        assert realize(schema(cls)()) == cls(), cls
    assert issubclass(schema(HillClimbConfig), schema(SearchConfig))  # so search=<strategy> merges into the search node
    with pytest.raises(ConfigError, match="search.population_size 0 must be >= 1"):
        realize(schema(HillClimbConfig)(population_size=0))
    with pytest.raises(ConfigError, match="fitness.size_weight must be a finite number"):
        realize(schema(AppConfig)(search=schema(HillClimbConfig)(), fitness=schema(type(AppConfig().fitness))(size_weight=float("inf"))))


def test_a_count_and_a_time_budget_together_both_hold():
    from fmnas_jax.objective import Allowance

    app = to_app_config(_compose("+experiment=hillclimb", "search.budget=6"))
    assert app.search.budget == 6 and app.search.time_budget == "14m"  # both kept, not one silently dropped
    from fmnas_jax.budget import TimeBudget
    from fmnas_jax.genome import PAPER_GENOME, Genome

    allowance = Allowance(count=2, budget=TimeBudget(1000))
    g = Genome.parse(PAPER_GENOME)
    assert [allowance.admit(g, 100) for _ in range(3)] == [True, True, False] and allowance.exhausted  # the count ended first


def test_the_benchmarks_objective_is_the_main_jobs():
    """bench/benchstats.py scores winners with the main job's fitness and search space, which its searches run under."""
    from bench.benchstats import MAIN_FITNESS

    app = to_app_config(_compose("+experiment=hillclimb"))
    assert app.fitness == MAIN_FITNESS
    assert dataclasses.replace(app.search_space, max_params=None) == SearchSpace()  # parsing a winner needs no cap


def test_the_settings_import_no_jax():
    """The config layer (and so a bad setting's error) needs no JAX: a fresh interpreter imports it without."""
    import subprocess
    import sys

    code = "import sys, fmnas_jax.config; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_configuration_reference_is_what_the_config_files_say():
    # docs/configuration.md is generated from the packaged config files: regenerate it when they change
    # (python -m fmnas_jax.conf_reference > docs/configuration.md).
    from pathlib import Path

    from fmnas_jax.conf_reference import GROUPS, markdown

    text = markdown()
    assert (Path(__file__).parents[1] / "docs" / "configuration.md").read_text() == text
    for group in GROUPS:
        assert f"## `{group}`" in text
    assert "| `val_size` | `5000` | stratified validation split" in text  # a group's key, its default, its comment
    assert "| `search.time_budget` | `14m` |" in text  # an experiment's settings, dotted
    assert "| `fitness.size_weight` | `0.01` |" in text and "`hydra." not in text  # Hydra's own settings are not the user's
