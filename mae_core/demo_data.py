"""An offline labelled demo set, cut from images that ship inside scikit-image's wheel.

Classes (folder names are the labels, ``root/<class>/*.png``): ``face`` and ``non-face`` (the 100 +
100 greyscale 25×25 crops of ``skimage.data.lfw_subset()``, upscaled), and ``brick``, ``grass``,
``gravel``, ``moon``, ``coins``, ``camera`` (random crops of those greyscale photos, of random size
and rotation by multiples of 90°). Eight classes, so top-5 accuracy means something. Every image is
64×64 RGB PNG; 500 images, ~3 MB. The same version gives the same files, byte
for byte (a seeded generator; PNG encoding is deterministic).

The set is written once into a temporary folder beside its target and renamed into place, so a
reader (or a second writer) never sees half a set; later calls reuse it.

Example:
    $ python -m mae_core.demo_data checkpoints/.demo-labelled
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mae_core.checks import DataError
from mae_core.fileio import fsync_dir
from mae_core.rundir import DEFAULT_RUNS_DIR

DEFAULT_PATH = Path(DEFAULT_RUNS_DIR) / ".demo-labelled"
# Bump when the recipe changes: a cached set of another version is rebuilt.
VERSION = 1
SIDE = 64
# Greyscale photos of one material or scene each; crops of one photo form a class.
TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "camera")
CROPS_PER_TEXTURE = 50
SEED = 0
MANIFEST = "demo-set.json"


def _lfw() -> tuple[np.ndarray, np.ndarray]:
    """(faces, non-faces) as uint8 (100, 25, 25) each; lfw_subset holds faces first."""
    from skimage import data

    images = (data.lfw_subset() * 255).round().astype(np.uint8)
    return images[:100], images[100:]


def _texture_crops(name: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    from skimage import data

    photo = getattr(data, name)()
    crops = []
    for _ in range(count):
        # Crops of different scales (48 to 160 px, within the photo), all resized to SIDE.
        side = int(rng.integers(48, min(161, min(photo.shape[:2]) + 1)))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = np.rot90(photo[top:top + side, left:left + side], k=int(rng.integers(0, 4)))
        crops.append(np.ascontiguousarray(crop))
    return crops


def demo_images() -> dict[str, list[Image.Image]]:
    """Every class's images, 64×64 RGB, in a fixed order."""
    rng = np.random.default_rng(SEED)
    faces, others = _lfw()
    grey = {"face": list(faces), "non-face": list(others)}
    for name in TEXTURES:
        grey[name] = _texture_crops(name, CROPS_PER_TEXTURE, rng)
    return {label: [Image.fromarray(a).resize((SIDE, SIDE), Image.BICUBIC).convert("RGB")
                    for a in arrays] for label, arrays in grey.items()}


def _manifest(counts: dict[str, int]) -> dict:
    return {"version": VERSION, "side": SIDE, "seed": SEED, "classes": counts,
            "source": "scikit-image lfw_subset, " + ", ".join(TEXTURES)}


def is_current(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("version") == VERSION


def ensure_demo_set(path: str | Path = DEFAULT_PATH) -> Path:
    """The demo set at ``path``, written first if it is missing or of another version."""
    path = Path(path).expanduser()
    if is_current(path):
        return path
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file, not a folder for the demo set")
    if path.exists() and not (path / MANIFEST).exists() and any(path.iterdir()):
        raise DataError(f"{path} exists and is not a demo set: choose an empty or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}."))
    try:
        counts = {}
        for label, images in demo_images().items():
            (tmp / label).mkdir()
            for i, image in enumerate(images):
                image.save(tmp / label / f"{label}-{i:03d}.png", optimize=False)
            counts[label] = len(images)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(counts), indent=2))
        _replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace(tmp: Path, path: Path) -> None:
    """Rename the finished set into place. A stale set is moved aside first; if another process
    put a current set there meanwhile, theirs is kept (ours is deleted by the caller)."""
    if path.exists() and not is_current(path):
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:
        if not is_current(path):
            raise
    fsync_dir(path.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mae_core.demo_data",
                                     description="Write the offline labelled demo set.")
    parser.add_argument("out", nargs="?", default=str(DEFAULT_PATH),
                        help=f"folder to write (default {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        path = ensure_demo_set(args.out)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = json.loads((path / MANIFEST).read_text())["classes"]
    print(f"demo set at {path}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
