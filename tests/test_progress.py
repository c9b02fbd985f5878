"""The per-epoch bar: its rate and ETA count only the epochs it has timed."""

from fmnas_jax.progress import EpochBar


def _state(bar: EpochBar) -> dict:
    assert bar._bar is not None
    return bar._bar.format_dict


def test_epoch_bar_times_epochs_after_the_first_report():
    with EpochBar(10) as bar:
        bar.update("g", 1, {"val_accuracy": 0.5})
        first = _state(bar)
        # Epoch 1 ended before the bar existed: it is the bar's starting point, not an epoch done in 0 s.
        assert (first["n"], first["initial"]) == (1, 1)
        bar.update("g", 2, {"val_accuracy": 0.6})
        bar.update("g", 3, {"val_accuracy": 0.7})
        state = _state(bar)
        assert state["n"] - state["initial"] == 2 and state["postfix"] == "val_acc=0.7000"


def test_epoch_bar_starts_over_for_a_new_or_resumed_evaluation():
    with EpochBar(10) as bar:
        for epoch in (1, 2, 3):
            bar.update("a", epoch, {"val_accuracy": 0.5})
        bar.update("b", 1, {"val_accuracy": 0.4})  # the next evaluation
        assert (_state(bar)["n"], _state(bar)["initial"]) == (1, 1)
        bar.close()
        bar.update("c", 4, {"val_accuracy": 0.8})  # resumed from a checkpoint at epoch 4
        assert (_state(bar)["n"], _state(bar)["initial"]) == (4, 4)


def test_epoch_bar_takes_a_deadlines_new_plan():
    with EpochBar(40) as bar:
        bar.update("g", 1, {"val_accuracy": 0.5, "epochs_planned": 40.0})
        assert _state(bar)["total"] == 40
        bar.update("g", 2, {"val_accuracy": 0.6, "epochs_planned": 31.0})  # the trainer re-planned to 31 epochs
        assert _state(bar)["total"] == 31 and _state(bar)["n"] == 2
