"""A prepared set whose bytes were damaged on disk after preparation: an unreadable item is
replaced and named, as an undecodable picture is; a chunk whose header is gone is refused with
the set's name and what to do, not LitData's ``struct.error`` from inside its reader."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_core import crops, prepared, shards
from mae_core.checks import DataError

COUNT = 12


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    src = root / "photos"
    src.mkdir()
    for i in range(COUNT):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"{i:03d}.jpg")
    prepared.prepare(str(src), root / "set", short_side=256, workers=1, verbose=False)
    return root / "set"


def damaged_copy(good: Path, where: Path, damage) -> Path:
    shutil.copytree(good, where)
    [chunk] = where.glob("chunk-*.bin")
    data = bytearray(chunk.read_bytes())
    damage(data)
    chunk.write_bytes(bytes(data))
    return where


def offset_gone(item: int):
    """LitData's chunk: item count (uint32), then count + 1 uint32 offsets, then the items."""
    def damage(data: bytearray) -> None:
        data[4 + 4 * item: 8 + 4 * item] = struct.pack("<I", 0xFFFFFFF0)
    return damage


def read_all(path: Path) -> list[dict]:
    dataset = shards.streaming_dataset(str(path), 32, shuffle=False)
    return [dataset[i] for i in range(len(dataset))]


def test_the_good_set_reads_whole(good_set):
    ids = [item["id"] for item in read_all(good_set)]
    assert sorted(ids) == list(range(COUNT))


def test_an_item_whose_place_in_its_chunk_is_damaged_is_replaced_and_named(good_set, tmp_path,
                                                                               capsys):
    path = damaged_copy(good_set, tmp_path / "set", offset_gone(5))
    items = read_all(path)
    assert len(items) == COUNT  # the epoch keeps its length: DDP ranks stay in step
    assert all(tuple(item["image"].shape) == (3, 32, 32) for item in items)
    assert -1 in [item["id"] for item in items]
    err = capsys.readouterr().err
    assert "replacing item" in err and "its bytes in the prepared set are damaged" in err


def test_a_chunk_whose_header_is_gone_is_refused_with_the_sets_name(good_set, tmp_path):
    def header_gone(data: bytearray) -> None:
        data[:4] = struct.pack("<I", 33_554_472)

    path = damaged_copy(good_set, tmp_path / "set", header_gone)
    with pytest.raises(DataError, match=f"{path}|cannot be used") as refused:
        read_all(path)
    assert "prepare" in str(refused.value) and "again" in str(refused.value)
    assert "struct.error" not in str(refused.value)


def test_the_raw_reader_names_the_set_too(good_set, tmp_path):
    path = damaged_copy(good_set, tmp_path / "set", offset_gone(0))
    with pytest.raises(DataError, match=rf"the prepared data set {path} is damaged: item 0"):
        shards.preview_images(str(path), 32, 4)


def test_the_first_undecodable_sample_is_an_undecodable_set():
    assert issubclass(crops.UndecodableSet, DataError)


class RunsCodeWhenRead:
    """Unpickled, it opens (creates) ``marker``: what any code in a hostile set could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _hostile_item(item: tuple[int, str, bytes]) -> dict:
    index, marker, jpeg = item
    return {"id": index, "image": RunsCodeWhenRead(marker), "mid": jpeg, "small": jpeg}


def test_a_set_whose_fields_would_be_unpickled_is_refused_unread(good_set, tmp_path):
    """LitData decodes each field as its index.json says, and a field stored as "pickle" runs
    code when read: a set naming any format prepare never writes is refused before an item of it
    is read, by the trainer's reader and the previews (in the app's own process) alike."""
    from litdata import optimize

    marker = tmp_path / "code-ran"
    jpeg = (good_set.parent / "photos" / "000.jpg").read_bytes()
    hostile = tmp_path / "hostile"
    optimize(fn=_hostile_item, inputs=[(i, str(marker), jpeg) for i in range(8)],
             output_dir=str(hostile), chunk_bytes="64MB", num_workers=1)
    shutil.copy(good_set / prepared.MANIFEST_NAME, hostile / prepared.MANIFEST_NAME)
    manifest, why = prepared.check_set(hostile)
    assert manifest is None and "stores fields as 'pickle'" in why, why
    with pytest.raises(DataError, match=f"data set {hostile} is damaged .*'pickle'"):
        prepared.read_manifest(hostile)
    for read in (lambda: read_all(hostile), lambda: shards.preview_images(str(hostile), 32, 4)):
        with pytest.raises(DataError, match=f"data set {hostile} is refused: .*'pickle'.* run code"):
            read()
    assert not marker.exists()
    # The reader checks the set itself: one named by hand skips check_set (a remote set's index
    # is checked the same way, in LitData's local copy of it).
    assert prepared.unsafe_format({"config": {"data_format": ["int", "bytes", "bytes", "bytes"]}}) \
        is None
    assert prepared.unsafe_format({"config": {"data_format": ["int", "tensor"]}})
    assert prepared.unsafe_format({"config": {}}) and prepared.unsafe_format([])
