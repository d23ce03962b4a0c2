"""``python -m bench.data``'s parts on a tiny folder: generated JPEGs, and both loaders measured."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the benchmark package lives beside mae_core, at the top
    sys.path.insert(0, str(REPO_ROOT))

from bench import data as bench_data  # noqa: E402
from mae_core import prepared  # noqa: E402


def test_generated_jpegs_and_both_loader_rates(tmp_path):
    folder = tmp_path / "folder"
    bench_data.generate(folder, 40, procs=2)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 40
    with Image.open(files[0]) as image:
        assert image.size == bench_data.SIZE and image.format == "JPEG"
    prepared.prepare(str(folder), tmp_path / "prepared", workers=1, verbose=False)
    rates = bench_data.loaders(folder, tmp_path / "prepared", 32, rounds=1, seconds=0.2, batch=4)
    assert rates["folder_pil_images_per_s_per_core"] > 0 and rates["prepared_images_per_s_per_core"] > 0
    assert rates["ratio"] > 0  # (of the unrounded rates: rounded tiny rates would not match it)
