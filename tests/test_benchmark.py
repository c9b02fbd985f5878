"""The strategy benchmark's statistics on a fixed CSV give the numbers worked out by hand."""

import math
from dataclasses import replace

import numpy as np
import pytest

from bench.benchstats import (
    Row,
    anytime_means,
    append_row,
    mean_interval,
    objective_on_test,
    paired_difference,
    paired_differences,
    pairs_needed,
    read_rows,
    rows_of_cpu,
    summary_table,
)
from fmnas_jax.genome import SearchSpace, count_params, parse_genome, train_flops_per_image
from fmnas_jax.search.fitness import FitnessConfig

PAPER = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"  # winners in the fixed rows (their objective: accuracy)
T_975_2 = 4.302652729749464  # Student t, 97.5 % quantile, 2 degrees of freedom


def _rows():
    acc = {"random+asha": [0.90, 0.91, 0.89], "hillclimb+asha": [0.91, 0.93, 0.90], "tpe+asha": [0.92, 0.90]}
    return [Row(name, "yes" if name == "hillclimb+asha" else "no", seed, PAPER, 10000 + seed, a + 0.005, a, 100, 600.0, 30, a + 0.01)
            for name, values in acc.items() for seed, a in enumerate(values)]  # fmt: skip


def test_csv_round_trip_appends_rows(tmp_path):
    path = tmp_path / "bench.csv"
    assert read_rows(path) == []
    for r in _rows():
        append_row(path, r)
    assert read_rows(path) == _rows()
    header = "strategy,main,seed,winner,params,val_accuracy,test_accuracy,evaluations,wall_seconds"
    assert path.read_text().splitlines()[0].startswith(header)


def test_mean_interval_by_hand():
    i = mean_interval([0.90, 0.91, 0.89])
    sd = 0.01
    assert i.mean == pytest.approx(0.90) and i.n == 3
    assert i.half_width == pytest.approx(T_975_2 * sd / math.sqrt(3))
    assert mean_interval([0.5]).low == 0.5 and math.isnan(mean_interval([]).mean)


def test_paired_difference_by_hand():
    d = paired_difference(_rows(), "hillclimb+asha", "random+asha")
    diffs = [0.01, 0.02, 0.01]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d.n == 3 and d.mean == pytest.approx(mean)
    assert (d.low, d.high) == pytest.approx((mean - T_975_2 * sd / math.sqrt(3), mean + T_975_2 * sd / math.sqrt(3)))
    assert d.low < 0 < d.high  # three seeds this close do not tell them apart
    tpe = paired_difference(_rows(), "tpe+asha", "random+asha")  # only the seeds both ran: 0 and 1
    assert tpe.n == 2 and tpe.mean == pytest.approx(((0.92 - 0.90) + (0.90 - 0.91)) / 2)
    per_seed = paired_differences(_rows(), "tpe+asha", "hillclimb+asha")  # any two strategies, per (seed, CPU)
    assert list(per_seed) == [(0, ""), (1, "")] and list(per_seed.values()) == pytest.approx([0.01, -0.03])


def _differences(mean: float, sd: float) -> list[float]:
    return [mean - sd / math.sqrt(2), mean + sd / math.sqrt(2)]  # two values: this mean, this sample standard deviation


@pytest.mark.parametrize(("effect", "pairs"), [(0.8, 15), (0.5, 34), (0.2, 199)])
def test_pairs_needed_matches_the_paired_t_test_tables(effect, pairs):
    # the standard sample sizes of a two-sided paired t-test at alpha 0.05 and 80 % power (Cohen's d = effect)
    assert pairs_needed(_differences(effect * 0.01, 0.01)) == pairs
    assert pairs_needed(_differences(effect * 0.01, 0.01), power=0.9) > pairs  # more power, more seeds


def test_pairs_needed_refuses_what_cannot_win_and_bad_input():
    assert pairs_needed(_differences(-0.002, 0.01)) is None and pairs_needed([0.0, 0.0]) is None  # not ahead: never
    assert pairs_needed(_differences(0.0001, 0.01), most=1000) is None  # ahead by too little to show in 1,000 seeds
    assert pairs_needed([0.01, 0.01]) == 2  # no noise
    with pytest.raises(ValueError, match="1 differences"):
        pairs_needed([0.01])
    with pytest.raises(ValueError, match="power 1.5"):
        pairs_needed([0.01, 0.02], power=1.5)


def test_summary_table_names_the_main_job_and_the_paired_differences():
    table = summary_table(_rows(), "random+asha")
    assert "| hillclimb+asha (main job) | 3 | 91.33 (" in table
    assert "+1.33 (" in table and "n=3" in table
    assert "| random+asha | 3 | 90.00 (" in table and "| — | — |" in table


def test_the_objective_credits_a_smaller_cheaper_winner_as_the_search_does():
    """The main job's fitness: half the parameters is worth one point, and so is half the training FLOPs."""
    small = "NC 4 5 sigmoid;RC 32 3 relu;NC 4 5 sigmoid;RC 32 3 relu;FL gelu;"
    g = parse_genome(small, SearchSpace())
    big = Row("random+asha", "no", 0, PAPER, 16598, 0.905, 0.90, 100, 600.0)
    mine = replace(big, strategy="hillclimb+asha", winner=small, params=count_params(g), test_accuracy=0.895)
    assert objective_on_test(big) == pytest.approx(0.90)  # the paper's genome, the references (16,598 params, 9,822,336 FLOPs): no charge
    charge = 0.01 * math.log2(count_params(g) / 16598) + 0.01 * math.log2(train_flops_per_image(g) / 9822336)
    assert charge < 0 and objective_on_test(mine) == pytest.approx(0.895 - charge)
    assert objective_on_test(mine, FitnessConfig(size_weight=0.0)) == pytest.approx(0.895)
    assert paired_difference([big, mine], "hillclimb+asha", "random+asha").mean == pytest.approx(-0.005)
    d = paired_difference([big, mine], "hillclimb+asha", "random+asha", objective_on_test)
    assert d.mean == pytest.approx(-0.005 - charge) and d.n == 1
    table = summary_table([big, mine], "random+asha")
    assert f"| -0.50 (-0.50 .. -0.50), n=1 | {100 * d.mean:+.2f} (" in table


def test_rows_of_one_cpu_only_and_a_csv_without_the_cpu_column_still_reads(tmp_path):
    epyc = [replace(r, cpu="AMD EPYC") for r in _rows()]
    xeon = [replace(r, cpu="Intel Xeon", test_accuracy=0.5) for r in _rows()[:2]]
    assert rows_of_cpu(epyc + xeon) == ("AMD EPYC", epyc)  # the CPU with most rows
    assert rows_of_cpu(epyc + xeon, "Intel Xeon") == ("Intel Xeon", xeon)
    assert rows_of_cpu(epyc, "Apple M2") == ("Apple M2", [])
    old = tmp_path / "old.csv"  # written before the column existed
    header = "strategy,main,seed,winner,params,val_accuracy,test_accuracy,evaluations,wall_seconds"
    old.write_text(header + "\nrandom,no,3,g3,5000,0.9,0.89,40,600.0\n")
    (row,) = read_rows(old)
    assert row.cpu == "" and row.params == 5000 and row.test_accuracy == 0.89
    assert rows_of_cpu([row]) == ("", [row])


def test_pairs_are_one_seed_on_one_cpu_and_pool_across_cpus():
    base = _rows()  # seeds 0-2 of random+asha and hillclimb+asha, differences 0.01, 0.02, 0.01
    slow = [replace(r, cpu="Intel Xeon", seed=r.seed + 10, test_accuracy=r.test_accuracy - 0.2) for r in base if r.seed == 0]
    d = paired_difference(base + slow, "hillclimb+asha", "random+asha")
    assert d.n == 4 and d.mean == pytest.approx((0.01 + 0.02 + 0.01 + 0.01) / 4)  # the slow CPU's block: its own pair
    moved = [replace(r, cpu="Intel Xeon") if r.strategy == "hillclimb+asha" and r.seed == 2 else r for r in base]
    d = paired_difference(moved, "hillclimb+asha", "random+asha")
    assert d.n == 2 and d.mean == pytest.approx(0.015)  # seed 2 ran on two CPUs: no pair


def test_anytime_means_average_step_curves_over_the_seeds_every_strategy_ran():
    curves = {
        "a": {0: [(10.0, 0.80), (30.0, 0.86)], 1: [(20.0, 0.84)], 2: [(5.0, 0.99)]},  # seed 2: a alone, left out
        "b": {0: [(10.0, 0.70)], 1: [(10.0, 0.80), (25.0, 0.90)]},
    }
    seeds, means = anytime_means(curves, np.array([0.0, 10.0, 20.0, 30.0]))
    assert seeds == [0, 1]
    np.testing.assert_allclose(means["a"], [np.nan, np.nan, (0.80 + 0.84) / 2, (0.86 + 0.84) / 2])  # NaN until both seeds have one
    np.testing.assert_allclose(means["b"], [np.nan, (0.70 + 0.80) / 2, (0.70 + 0.80) / 2, (0.70 + 0.90) / 2])
    seeds, means = anytime_means({"a": curves["a"], "c": {3: [(1.0, 0.5)]}}, np.array([0.0]))
    assert seeds == [] and np.isnan(means["a"]).all()  # nothing paired: nothing drawn as if it were


def test_within_a_radius_is_every_genome_that_many_moves_away():
    from helpers import every_genome, moves

    from bench.bench_neighbours import within
    from fmnas_jax.genome import Genome, SearchSpace

    space = SearchSpace(kernel_sizes=(1, 2, 3), filters=(4, 8), activations=("relu", "gelu"), max_params=None)
    g = Genome.parse("NC 4 2 relu;RC 4 2 gelu;NC 4 1 relu;RC 4 2 relu;FL relu;", space)
    near = within(g, space, 2)
    assert near == {str(h): moves(g, h, space) for h in every_genome(space) if 1 <= moves(g, h, space) <= 2}


SUITE = """
import subprocess, sys, time

def test_sleeps():
    time.sleep(0.3)

def test_computes():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass

def test_starts_a_process():
    burn = "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
"""


def test_the_suite_profile_writes_each_tests_wall_and_cpu_seconds(tmp_path):
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_three.py").write_text(SUITE)
    out = tmp_path / "profile.csv"
    mine = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not a worker of this run's pytest-xdist
    env = mine | {"SUITE_PROFILE_CSV": str(out), "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.suite_profile", "test_three.py"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)  # fmt: skip
    rows = {r["test"].split("::")[1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"test_sleeps", "test_computes", "test_starts_a_process"}
    number = lambda test, column: float(rows[test][column])  # noqa: E731
    assert number("test_sleeps", "wall_seconds") >= 0.3 and number("test_sleeps", "self_cpu") < 0.2
    assert number("test_computes", "self_cpu") >= 0.3 and number("test_computes", "children_cpu") == 0
    assert number("test_starts_a_process", "children_cpu") >= 0.3
