"""mae_core.metrics: a run's metrics.jsonl read as it grows (only new bytes), and thinned for display."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mae_core.metrics import MetricsReader, MetricsStore, thin


def line(step: int, **values: float) -> str:
    return json.dumps({"step": step, **values}) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


@pytest.fixture
def metrics(tmp_path) -> Path:
    return tmp_path / "metrics.jsonl"


def test_reads_only_what_was_appended(metrics):
    metrics.write_text(line(1, loss=1.5) + line(2, loss=1.25) + line(3, loss=1.0))
    reader = MetricsReader(metrics)
    assert reader.refresh() and reader.rows == 3
    assert not reader.refresh(), "nothing new: a second refresh must report no change"
    # Rewrite the first line in place with a same-length value, then append: an incremental
    # reader never looks at the old bytes again, so it keeps the value it parsed first.
    text = metrics.read_text()
    with open(metrics, "r+") as handle:
        handle.write(text.replace('"loss": 1.5}', '"loss": 9.5}', 1)[: len(text)])
    append(metrics, line(4, loss=0.75) + line(5, loss=0.5))
    assert reader.refresh() and reader.rows == 5
    steps, losses = reader.series("loss")
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert losses.tolist() == [1.5, 1.25, 1.0, 0.75, 0.5]


def test_a_partial_last_line_waits_for_its_newline(metrics):
    metrics.write_text(line(1, loss=2.0) + '{"step": 2, "lo')
    reader = MetricsReader(metrics)
    reader.refresh()
    assert reader.series("loss")[0].tolist() == [1]
    append(metrics, 'ss": 1.75}\n')
    assert reader.refresh()
    steps, losses = reader.series("loss")
    assert steps.tolist() == [1, 2] and losses.tolist() == [2.0, 1.75]


def test_a_torn_line_is_skipped_and_reading_goes_on(metrics):
    # A kill mid-write leaves a torn line; the trainer's next line starts after it.
    metrics.write_text(line(1, loss=2.0) + '{"step": 2, "loss": 1.\n' + line(3, loss=1.5)
                       + "not json at all\n" + '["a list"]\n' + '{"loss": 4.0}\n' + line(4, loss=1.0))
    reader = MetricsReader(metrics)
    steps, losses = reader.series("loss")
    assert steps.tolist() == [1, 3, 4] and losses.tolist() == [2.0, 1.5, 1.0]


def test_a_file_truncated_in_place_starts_over(metrics):
    metrics.write_text("".join(line(s, loss=10.0 - s) for s in range(1, 9)))
    reader = MetricsReader(metrics)
    assert reader.series("loss")[0].tolist() == list(range(1, 9))
    metrics.write_text("".join(line(s, loss=10.0 - s) for s in range(1, 4)))  # same inode, shorter
    assert reader.refresh()
    assert reader.rows == 3
    assert reader.series("loss")[0].tolist() == [1, 2, 3]
    append(metrics, line(4, loss=5.5))
    assert reader.series("loss")[1].tolist() == [9.0, 8.0, 7.0, 5.5]


def test_a_replaced_file_starts_over_even_when_longer(metrics):
    """A resume rewrites metrics.jsonl atomically (a new file); its content may be longer."""
    metrics.write_text(line(1, loss=3.0) + line(2, loss=2.0))
    reader = MetricsReader(metrics)
    assert reader.rows == 0 and reader.series("loss")[0].tolist() == [1, 2]
    replacement = metrics.with_suffix(".tmp")
    replacement.write_text("".join(line(s, loss=0.5) for s in range(10, 14)))
    os.replace(replacement, metrics)
    assert reader.refresh()
    steps, losses = reader.series("loss")
    assert steps.tolist() == [10, 11, 12, 13] and losses.tolist() == [0.5] * 4


def test_a_removed_file_empties_the_reader(metrics):
    metrics.write_text(line(1, loss=1.0))
    reader = MetricsReader(metrics)
    assert reader.series("loss")[0].tolist() == [1]
    metrics.unlink()
    assert reader.refresh() and reader.rows == 0
    assert reader.series("loss")[0].tolist() == []
    assert MetricsReader(metrics).last("loss") is None


def test_the_last_line_for_a_repeated_step_wins(metrics):
    # A resume may log a step again after the checkpoint it restarted from.
    metrics.write_text(line(1, loss=3.0) + line(2, loss=2.0) + line(3, loss=1.0)
                       + line(2, loss=2.5) + line(3, loss=1.5))
    steps, losses = MetricsReader(metrics).series("loss")
    assert steps.tolist() == [1, 2, 3]
    assert losses.tolist() == [3.0, 2.5, 1.5]


def test_out_of_order_steps_come_back_in_step_order(metrics):
    metrics.write_text(line(5, loss=0.5) + line(3, loss=0.3) + line(4, loss=0.4) + line(1, loss=0.1))
    reader = MetricsReader(metrics)
    steps, losses = reader.series("loss")
    assert steps.tolist() == [1, 3, 4, 5] and losses.tolist() == [0.1, 0.3, 0.4, 0.5]
    assert reader.last("loss") == (5, 0.5)


def test_a_key_missing_from_some_rows_and_non_finite_values_are_left_out(metrics):
    metrics.write_text(line(1, loss=1.0, lr=1e-4) + line(2, loss=0.9) + '{"step": 3, "loss": NaN}\n'
                       + line(4, loss=0.8, epoch_loss=0.95) + '{"step": 5, "loss": true}\n')
    reader = MetricsReader(metrics)
    assert reader.series("lr")[0].tolist() == [1]
    assert reader.series("loss")[0].tolist() == [1, 2, 4]
    assert reader.series("epoch_loss")[0].tolist() == [4]
    assert reader.series("no_such_metric")[0].tolist() == []
    assert set(reader.keys()) >= {"loss", "lr", "epoch_loss"}


def test_thin_bounds_the_count_and_keeps_the_last_point():
    steps = np.arange(1, 100_001, dtype=np.int64)
    values = np.linspace(5.0, 1.0, len(steps))
    thinned_steps, thinned = thin(steps, values, 1000)
    assert len(thinned_steps) == len(thinned) <= 1000
    assert thinned_steps[-1] == 100_000 and thinned_steps[0] >= 1
    assert np.all(np.diff(thinned_steps) > 0)
    assert thinned[0] == pytest.approx(values[:100].mean())  # a bucket's mean, not one sample
    assert thinned[-1] == pytest.approx(values[-100:].mean())
    few_steps, few = thin(steps[:10], values[:10], 1000)
    assert few_steps.tolist() == steps[:10].tolist() and few.tolist() == values[:10].tolist()
    uneven_steps, _ = thin(steps[:1234], values[:1234], 500)
    assert len(uneven_steps) <= 500 and uneven_steps[-1] == 1234


def test_the_store_shares_one_reader_per_file(tmp_path):
    store = MetricsStore(max_files=2)
    a, b, c = (tmp_path / f"{name}.jsonl" for name in "abc")
    reader_a = store.reader(a)
    assert store.reader(a) is reader_a
    store.reader(b)
    store.reader(c)  # over the limit: the least recently used (a) is dropped
    assert store.reader(a) is not reader_a
