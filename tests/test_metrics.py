"""mae_core.metrics: a run's metrics.jsonl read as it grows (only new bytes), and thinned for display."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mae_core.metrics import MAX_COLUMNS, MetricsReader, MetricsStore, thin, write_csv


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


def test_a_link_or_a_fifo_in_the_files_place_is_no_curve(metrics, tmp_path):
    """A link planted in a run folder showed the file it named (outside the runs folder) as the
    run's curve; a FIFO is never opened (that blocks)."""
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(line(1, loss=1.0) + line(2, loss=0.5))
    metrics.symlink_to(outside)
    assert MetricsReader(metrics).series("loss")[0].tolist() == []
    metrics.unlink()
    os.mkfifo(metrics)
    assert MetricsReader(metrics).series("loss")[0].tolist() == []


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


def test_numbers_no_float_holds_and_bad_steps_are_skipped_without_harm(metrics):
    # A 400-digit int made math.isfinite raise OverflowError half-way through a refresh: the offset
    # had advanced and the columns were half-appended, so every later read of the run failed.
    huge = "1" + "0" * 400
    metrics.write_text(line(1, loss=2.0, lr=0.1)
                       + f'{{"step": 2, "loss": {huge}, "lr": 0.2}}\n'
                       + '{"step": 3, "loss": NaN, "lr": Infinity, "mfu": -Infinity}\n'
                       + '{"step": 4, "loss": true, "lr": "0.4", "epoch": null}\n'
                       + '{"step": 2.5, "loss": 9.0}\n' + '{"step": -1, "loss": 9.0}\n'
                       + f'{{"step": {huge}, "loss": 9.0}}\n' + '{"step": null, "loss": 9.0}\n'
                       + '{"step": true, "loss": 9.0}\n' + '{"step": "6", "loss": 9.0}\n'
                       + '{"step": 1e300, "loss": 9.0}\n' + "[" * 100_000 + "\n"
                       + '{"step": 5.0, "loss": 1.0}\n')
    reader = MetricsReader(metrics)
    assert reader.refresh() and reader.rows == 5  # steps 1-5; every other line skipped
    assert reader.series("loss")[0].tolist() == [1, 5]
    assert reader.series("loss")[1].tolist() == [2.0, 1.0]
    assert reader.series("lr")[1].tolist() == [0.1, 0.2]
    assert reader.series("mfu")[0].tolist() == [] and reader.series("epoch")[0].tolist() == []
    steps, columns = reader.snapshot()
    assert steps == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(len(values) == len(steps) for values in columns.values())
    # The state is whole: later lines, huge values among them, append as usual.
    append(metrics, line(6, loss=0.5, lr=0.6) + f'{{"step": 7, "loss": -{huge}, "lr": 0.7}}\n'
           + line(8, loss=0.25))
    assert reader.refresh() and reader.rows == 8
    steps, losses = reader.series("loss")
    assert steps.tolist() == [1, 5, 6, 8] and losses.tolist() == [2.0, 1.0, 0.5, 0.25]
    assert reader.series("lr")[0].tolist() == [1, 2, 6, 7]
    assert reader.last("loss") == (8, 0.25)
    csv = write_csv(reader, metrics.with_name("metrics.csv")).read_text().splitlines()
    assert len(csv) == 9 and csv[0].split(",")[0] == "step"
    assert [row.split(",")[0] for row in csv[1:]] == [str(s) for s in range(1, 9)]


def test_the_csv_writes_the_epoch_as_a_whole_number(metrics):
    metrics.write_text('{"step": 1, "epoch": 0, "loss": 1.5}\n{"step": 2, "epoch": 1, "loss": 1.25}\n'
                       '{"step": 2, "epoch_loss": 1.375, "epoch": 1}\n{"step": 3, "loss": 1.0}\n')
    rows = write_csv(MetricsReader(metrics), metrics.with_name("metrics.csv")).read_text()
    assert rows.splitlines() == ["step,epoch,loss,epoch_loss", "1,0,1.5,", "2,1,1.25,",
                                 "2,1,,1.375", "3,,1.0,"]  # a row per line: the epoch's its own


def test_a_failed_append_leaves_the_reader_as_it_was(metrics, monkeypatch):
    """Whatever goes wrong while rows are added, the offset and the columns stay consistent."""
    metrics.write_text(line(1, loss=1.0) + line(2, loss=0.9))
    reader = MetricsReader(metrics)
    assert reader.rows == 0 and reader.series("loss")[0].tolist() == [1, 2]
    append(metrics, line(3, loss=0.8, lr=0.1) + line(4, loss=0.7, lr=0.2) + line(5, loss=0.6))
    original = MetricsReader._append_row

    def failing(self, step, values):
        if step == 4:  # after step 3 and its new column went in
            raise MemoryError("stand-in for any failure mid-append")
        original(self, step, values)

    monkeypatch.setattr(MetricsReader, "_append_row", failing)
    for _ in range(2):
        with pytest.raises(MemoryError):
            reader.refresh()
        assert reader.rows == 2  # step 3 rolled back, not appended again on the second try
    monkeypatch.setattr(MetricsReader, "_append_row", original)
    assert reader.refresh() and reader.rows == 5
    steps, columns = reader.snapshot()
    assert steps == [1.0, 2.0, 3.0, 4.0, 5.0] and list(columns) == ["loss", "lr"]
    assert all(len(values) == 5 for values in columns.values())
    assert reader.series("loss")[0].tolist() == [1, 2, 3, 4, 5]
    assert reader.series("lr")[1].tolist() == [0.1, 0.2]


def test_a_new_key_on_every_line_is_bounded_not_quadratic(metrics, caplog):
    # Each new column is back-filled for every earlier row: 8,000 new keys cost 29 s and 3.2 GB.
    lines = 8000
    metrics.write_text("".join(json.dumps({"step": i, f"k{i}": 1.0, "loss": 1.0 / i}) + "\n"
                               for i in range(1, lines + 1)))
    reader = MetricsReader(metrics)
    with caplog.at_level("WARNING", logger="mae_core.metrics"):
        assert reader.refresh() and reader.rows == lines
        append(metrics, json.dumps({"step": lines + 1, "k_more": 2.0, "loss": 0.5}) + "\n")
        assert reader.refresh() and reader.rows == lines + 1
    keys = reader.keys()
    assert len(keys) == MAX_COLUMNS
    assert keys[:2] == ["k1", "loss"] and "k_more" not in keys and f"k{lines}" not in keys
    assert len([r for r in caplog.records if "metric keys" in r.getMessage()]) == 1
    steps, losses = reader.series("loss")
    assert steps.tolist() == list(range(1, lines + 2))
    assert losses[:-1].tolist() == [1.0 / i for i in range(1, lines + 1)] and losses[-1] == 0.5
    assert reader.series("k1")[0].tolist() == [1]
    steps, columns = reader.snapshot()
    assert len(columns) == MAX_COLUMNS and all(len(v) == lines + 1 for v in columns.values())


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
