"""Reading a run's ``metrics.jsonl`` as it grows: only new bytes, kept as columns, thinned for display.

A live view polls every second or two, and a long GPU run writes one line per step (10⁵–10⁶ lines).
Re-parsing the whole file on every poll costs seconds; a :class:`MetricsReader` remembers its file
offset and the parsed columns, reads only what was appended, and starts over when the file was
replaced or truncated (a resume rewrites it up to the checkpoint's step). Columns are float arrays,
so a million rows hold a few tens of MB and a series is sliced with numpy, not Python loops.

A damaged or hostile file never raises and never costs more than linear time and memory: a value
that is not a finite, float-representable number (a bool, a string, NaN, an int beyond float range)
counts as absent, a line whose ``step`` is not a whole number in ``[0, 2**53]`` is skipped, and a
run has at most :data:`MAX_COLUMNS` metric columns (further keys are ignored, with one warning),
since each new column is back-filled for every earlier row.

Example:
    >>> reader = MetricsReader(Path("checkpoints/<run>/metrics.jsonl"))
    >>> steps, losses = reader.series("loss")          # every finite value, by step
    >>> steps, losses = thin(steps, losses, 2000)      # what goes to the browser
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from array import array
from pathlib import Path

import numpy as np

from mae_core.fileio import open_regular

_NAN = float("nan")

log = logging.getLogger(__name__)

# The trainer writes about 20 keys (loss, lr, images_per_s, elapsed_s, mfu, epoch, epoch_loss,
# val_loss, eval_s, knn_top1/5 and 8 knn_{cls,mean}_k{20,200}_top{1,5}); a new column costs one
# value per earlier row, so an unbounded count would make a file with a new key per line quadratic.
MAX_COLUMNS = 64
# The headline kNN figure, in the live monitor and in Evaluate alike: the mean patch token (MAE's
# loss never reaches the class token) at k = 20 (with banks of a few hundred images, k = 200
# votes across most of a class). The monitor's series for it; its knn_top1/knn_top5 repeat it.
HEADLINE_KNN_K = 20
HEADLINE_KNN_TOP1 = f"knn_mean_k{HEADLINE_KNN_K}_top1"
# Steps are kept as float64 and handed out as int64: whole numbers up to 2**53 are exact in both.
MAX_STEP = 2**53
_CHUNK_LINES = 8192  # lines parsed into rows before they are appended

_Row = tuple[float, dict]  # (step, a line's JSON object)


class MetricsReader:
    """The rows of one ``metrics.jsonl`` as columns (``step`` plus one per metric key), read
    incrementally. A line still being written (no newline yet) waits for the next read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reset(identity=None)

    def _reset(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity  # (device, inode) of the file the columns came from
        self._offset = 0
        self._partial = b""
        self._steps = array("d")
        self._columns: dict[str, array] = {}
        self._series_cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._warned_columns = False

    @property
    def rows(self) -> int:
        return len(self._steps)

    def refresh(self) -> bool:
        """Read what was appended since the last call; True if any row was added (or reset)."""
        with self._lock:
            try:
                stat = os.lstat(self.path)  # a link's own: open_regular below refuses one
            except OSError:
                changed = self.rows > 0
                self._reset(identity=None)
                return changed
            identity = (stat.st_dev, stat.st_ino)
            reset = identity != self._identity or stat.st_size < self._offset
            if reset:
                self._reset(identity)
            if stat.st_size == self._offset:
                return reset
            try:
                with open_regular(self.path) as handle:
                    handle.seek(self._offset)
                    data = handle.read(stat.st_size - self._offset)
            except OSError:  # removed or unreadable between the stat and the open: next poll
                return reset
            lines = (self._partial + data).split(b"\n")
            partial = lines.pop()  # b"" when data ended with a newline
            added = self._append_lines(lines)
            # Only now, with every row in: an exception above leaves offset and columns as they were.
            self._offset += len(data)
            self._partial = partial
            return reset or added > 0

    def _append_lines(self, lines: list[bytes]) -> int:
        """Parse ``lines`` a chunk at a time into rows (a chunk's rows bounded in memory), then
        append them; all of them or, on any exception, none: the columns are rolled back."""
        count, before = len(self._steps), set(self._columns)
        added = 0
        try:
            for start in range(0, len(lines), _CHUNK_LINES):
                rows = [row for row in map(_parse_line, lines[start:start + _CHUNK_LINES])
                        if row is not None]
                for step, row in rows:
                    self._append_row(step, row)
                added += len(rows)
        except BaseException:
            del self._steps[count:]
            for key in list(self._columns):
                if key in before:
                    del self._columns[key][count:]
                else:
                    del self._columns[key]
            raise
        return added

    def _append_row(self, step: float, row: dict) -> None:
        count = len(self._steps)
        self._steps.append(step)
        columns = self._columns
        for key, value in row.items():
            # Finite float-representable numbers only (json.loads gives exact int and float; a
            # bool is neither): NaN, ±Inf, an int beyond float range and anything else is absent.
            if type(value) is float:
                if not math.isfinite(value):
                    continue
            elif type(value) is int:
                value = _float_of_int(value)
                if value is None:
                    continue
            else:
                continue
            column = columns.get(key)
            if column is None:
                if key == "step":
                    continue
                if len(columns) >= MAX_COLUMNS:
                    if not self._warned_columns:
                        self._warned_columns = True
                        log.warning("%s: more than %d distinct metric keys; keys after the first "
                                    "%d (such as %r) are ignored", self.path, MAX_COLUMNS,
                                    MAX_COLUMNS, key)
                    continue
                column = columns[key] = array("d", [_NAN]) * count
            column.append(value)
        for column in columns.values():
            if len(column) == count:  # this row has no value for the key
                column.append(_NAN)

    def snapshot(self) -> tuple[list[float], dict[str, list[float]]]:
        """Every row read so far: (steps, {metric: values, NaN where a row has none})."""
        self.refresh()
        with self._lock:
            return list(self._steps), {k: list(v) for k, v in self._columns.items()}

    def keys(self) -> list[str]:
        self.refresh()
        return list(self._columns)

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``metric``: finite values only, in step order, the last line for a
        step winning (a resumed run may repeat steps)."""
        self.refresh()
        with self._lock:
            cached = self._series_cache.get(metric)
            if cached is not None and cached[0] == self.rows:
                return cached[1], cached[2]
            column = self._columns.get(metric)
            if column is None:
                steps, values = np.empty(0, np.int64), np.empty(0)
            else:
                steps, values = _last_per_step(np.frombuffer(self._steps, dtype=np.float64),
                                               np.frombuffer(column, dtype=np.float64))
            self._series_cache[metric] = (self.rows, steps, values)
            return steps, values

    def last(self, metric: str) -> tuple[int, float] | None:
        steps, values = self.series(metric)
        return (int(steps[-1]), float(values[-1])) if len(steps) else None


def _last_per_step(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if len(steps) and np.any(np.diff(steps) < 0):  # out of order: sort, stable for last-wins
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    if len(steps) > 1:
        last = np.append(steps[1:] != steps[:-1], True)
        steps, values = steps[last], values[last]
    return steps.astype(np.int64), values.copy()


def _parse_line(line: bytes) -> _Row | None:
    """(step, the line's object) of one line, or None when the line is no usable row: not JSON (a
    torn line from a kill, skipped as the trainer's own reader does), not an object, or without a
    ``step`` that is a whole number in ``[0, MAX_STEP]``. Never raises."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # also: ints over Python's digit limit, deep nesting
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if type(step) is int:
        return (float(step), row) if 0 <= step <= MAX_STEP else None
    if type(step) is float and 0 <= step <= MAX_STEP and step.is_integer():
        return step, row
    return None  # a bool, a fraction, NaN, a string, null, absent


def _float_of_int(value: int) -> float | None:
    """``value`` as a float, or None for an int beyond float range (``float`` and
    ``math.isfinite`` raise OverflowError on those)."""
    try:
        return float(value)
    except OverflowError:
        return None


def thin(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points: consecutive values averaged in equal buckets, each placed at
    its bucket's last step, so the curve's end is the latest value and its length stays bounded."""
    if len(steps) <= max_points:
        return steps, values
    bounds = np.linspace(0, len(steps), max_points + 1).astype(np.int64)
    starts = bounds[:-1]
    sums = np.add.reduceat(values, starts)
    sizes = np.diff(bounds)
    return steps[bounds[1:] - 1], sums / sizes


class MetricsStore:
    """One :class:`MetricsReader` per file, shared by every poll of every browser tab."""

    def __init__(self, max_files: int = 64) -> None:
        self.max_files = max_files
        self._readers: dict[Path, MetricsReader] = {}
        self._lock = threading.Lock()

    def reader(self, path: Path) -> MetricsReader:
        key = Path(path)
        with self._lock:
            reader = self._readers.pop(key, None) or MetricsReader(key)
            self._readers[key] = reader  # most recently used last
            while len(self._readers) > self.max_files:
                self._readers.pop(next(iter(self._readers)))
        return reader


def write_csv(reader: MetricsReader, path: Path, make_dirs: bool = True) -> Path:
    """Every logged row of the run as CSV (``step`` then one column per metric, blank where a row
    has none), written atomically: what a spreadsheet or pandas reads."""
    import csv
    import io

    from mae_core.fileio import atomic_write_text

    steps, by_key = reader.snapshot()
    keys, columns = list(by_key), list(by_key.values())
    buffer = io.StringIO()
    out = csv.writer(buffer)
    out.writerow(["step", *keys])
    # Every column is held as floats; the epoch is a count, written as one ("0.0" became a float
    # column in pandas, whose groupby labelled the epochs 0.0, 1.0, ...).
    whole = [key == "epoch" for key in keys]
    for i, step in enumerate(steps):
        out.writerow([int(step), *("" if math.isnan(c[i]) else str(int(c[i])) if w else repr(c[i])
                                   for c, w in zip(columns, whole))])
    atomic_write_text(path, buffer.getvalue(), make_dirs)
    return Path(path)
