"""Counts in messages read right for 1 as for many: "1 probe", "2 probes"."""

import smoothprof
from smoothprof.display import series_plot
from smoothprof.loading import _describe
from smoothprof.wording import plural


def test_plural_of_one_and_of_many():
    assert [plural(n, "probe") for n in (0, 1, 2)] == ["0 probes", "1 probe", "2 probes"]
    assert plural(1, "batch") == "1 batch" and plural(4, "batch") == "4 batches"
    assert plural(1, "training row") == "1 training row"
    assert plural(2, "index", "indices") == "2 indices"


def test_messages_with_a_count_of_one(tmp_path):
    assert _describe((1,)) == "a tuple of 1 item"
    assert _describe([1, 2]) == "a list of 2 items"
    path = tmp_path / "one.h5"
    with smoothprof.TrajectoryWriter(path) as writer:
        writer.append_train({"step": 0, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1})
    figure = series_plot(smoothprof.read_trajectory(path), width=80)
    assert "of all 1 step)" in figure and "1 steps" not in figure
