"""The offline labelled demo set: deterministic, labelled by its folders, written once and atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from mae_core import demo_data
from mae_core.data import DataError
from mae_core.features import class_folders


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_data.ensure_demo_set(tmp_path_factory.mktemp("demo") / "labelled")


def test_the_demo_set_is_labelled_by_its_class_folders(demo):
    classes = class_folders(demo)
    assert list(classes) == sorted(["brick", "camera", "coins", "face", "grass", "gravel", "moon",
                                    "non-face"])
    assert len(classes["face"]) == len(classes["non-face"]) == 100
    assert all(len(classes[name]) == demo_data.CROPS_PER_TEXTURE for name in demo_data.TEXTURES)
    manifest = json.loads((demo / demo_data.MANIFEST).read_text())
    assert manifest["classes"] == {name: len(paths) for name, paths in classes.items()}
    with Image.open(classes["face"][0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    # A face and a non-face differ (lfw_subset holds the faces first).
    with Image.open(classes["face"][0]) as a, Image.open(classes["non-face"][0]) as b:
        assert a.tobytes() != b.tobytes()


def test_the_demo_set_is_the_same_byte_for_byte_and_written_once(demo, tmp_path):
    again = demo_data.ensure_demo_set(tmp_path / "again")
    assert _digest(again) == _digest(demo)
    stamps = {p: p.stat().st_mtime_ns for p in again.rglob("*.png")}
    assert demo_data.ensure_demo_set(again) == again  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*.png")} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left behind


def test_a_set_of_another_version_is_rebuilt(tmp_path):
    root = demo_data.ensure_demo_set(tmp_path / "set")
    manifest = root / demo_data.MANIFEST
    manifest.write_text(json.dumps({"version": 0}))
    (root / "face" / "face-000.png").unlink()
    demo_data.ensure_demo_set(root)
    assert json.loads(manifest.read_text())["version"] == demo_data.VERSION
    assert (root / "face" / "face-000.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_folder_that_is_not_a_demo_set_is_never_overwritten(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not really")
    with pytest.raises(DataError, match="not a demo set"):
        demo_data.ensure_demo_set(precious)
    assert [p.name for p in precious.iterdir()] == ["holiday.jpg"]
    with pytest.raises(DataError, match="is a file"):
        demo_data.ensure_demo_set(precious / "holiday.jpg")


def test_the_command_writes_the_set(run_module, tmp_path):
    out = tmp_path / "cli"
    result = run_module("mae_core.demo_data", out)
    assert result.returncode == 0, result.stderr
    assert "face 100" in result.stdout and demo_data.is_current(out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = run_module("mae_core.demo_data", tmp_path / "taken")
    assert result.returncode == 2 and "not a demo set" in result.stderr
    assert "Traceback" not in result.stderr
