import csv
import json
import math

from fmnas_jax.data import CLASS_NAMES
from fmnas_jax.report import Card, Row, plot_confusion, plot_curves, plot_search, write_card, write_csv

ROWS = [
    Row("A;", 1000, 0.80, 0.79, 0.78, 0.5, "k1", "r1", "trained"),
    Row("B;", 4000, 0.90, 0.88, 0.87, 0.6, "k2", "r2", "reused"),
    Row("C;", 2000, 0.70, 0.69, 0.68, 0.4, "k3", "r3", "trained"),
]


def test_csv_has_the_paper_columns_sorted_by_params_with_the_front(tmp_path):
    path = write_csv(ROWS, tmp_path / "results.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[:4] == ["genome", "params", "train_accuracy", "test_accuracy"]
    assert [r["genome"] for r in rows] == ["A;", "C;", "B;"]
    assert [r["pareto"] for r in rows] == ["1", "0", "1"]  # C has more params than A and less accuracy


def test_card_files(tmp_path):
    card = Card("A;", 16598, 0.9, 0.89, 0.885, "key", "run", "sqlite:///x.db", "10 epochs")
    md, js = write_card(card, tmp_path)
    assert "16,598" in md.read_text() and "88.50%" in md.read_text()
    assert json.loads(js.read_text())["run_id"] == "run"
    nan_card = Card("A;", 1, math.nan, math.nan, 0.5, "", "", "u", "b")
    assert "n/a" in nan_card.markdown()
    assert "paper's best" in card.markdown() and "| data | fashion_mnist: 28x28x1, 10 classes |" in card.markdown()
    digits = Card("A;", 1, 0.9, 0.9, 0.9, "", "", "u", "b", "digits: 8x8x1, 10 classes (0, 1, 2, 3, ...)")
    assert "paper's best" not in digits.markdown() and "| data | digits: 8x8x1" in digits.markdown()  # the paper's line is Fashion-MNIST's


def test_figures_are_written(tmp_path):
    for path in (
        plot_search(ROWS, ["A;", "B;"], "B;", tmp_path / "s.png", "title", final=(4000, 0.9)),
        plot_search(ROWS, ["A;"], "A;", tmp_path / "other_data.png", "title", paper=False),
        plot_curves({"train_loss": [1, 0.5], "val_loss": [1.1, 0.6], "train_accuracy": [0.5, 0.8], "val_accuracy": [0.5, 0.7]}, "B;",
                    tmp_path / "c.png"),
        plot_confusion([[5, 1] + [0] * 8] + [[0] * 10] * 9, CLASS_NAMES, "cm", tmp_path / "cm.png"),
    ):  # fmt: skip
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
