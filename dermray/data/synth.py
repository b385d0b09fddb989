"""A small synthetic dataset in the exact HAM10000 layout: the demo's default and the tests' fixture.

Each lesion is an ellipse on a skin-toned background whose colour, size and texture depend on its
class, so that a classifier (even on random-weight CNN features) can learn the classes. Several
images per lesion, each a jittered view of the lesion, so that lesion-grouped splits matter.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import storage

logger = logging.getLogger(__name__)

# class -> (lesion RGB, radius scale, texture amplitude); distinct enough to learn
APPEARANCE: dict[str, tuple[tuple[int, int, int], float, float]] = {
    "akiec": ((200, 90, 80), 0.30, 10.0),
    "bcc": ((230, 190, 200), 0.25, 6.0),
    "bkl": ((165, 120, 70), 0.35, 14.0),
    "df": ((140, 95, 60), 0.18, 4.0),
    "mel": ((45, 30, 40), 0.38, 30.0),
    "nv": ((110, 65, 35), 0.28, 8.0),
    "vasc": ((150, 20, 70), 0.22, 5.0),
}
# nv dominates, as in HAM10000, but every class has enough lesions for a 3-way split
CLASS_WEIGHTS = np.array([0.09, 0.09, 0.11, 0.08, 0.11, 0.44, 0.08])
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face")
PART_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA_NAME = "HAM10000_metadata.csv"
MIN_SIDE, MAX_SIDE = 8, 2048  # pixels; HAM10000's originals are 600x450
MAX_N = 1_000_000  # image ids stay 7 digits (ISIC_0024306 onwards)
SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class SynthError(DermrayError, ValueError):
    """A bad size, count or destination for the synthetic dataset."""


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (``200x150``) as integers in [MIN_SIDE, MAX_SIDE], or SynthError."""
    match = SIZE.match(str(text))
    must = f"WIDTHxHEIGHT with each side in [{MIN_SIDE}, {MAX_SIDE}] pixels, e.g. 200x150"
    if not match:
        raise SynthError(f"--size must be {must}. Got {text!r} instead.")
    width, height = int(match[1]), int(match[2])
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise SynthError(f"--size must be {must}. Got {text!r} instead.")
    return width, height


def check_n(n: int, min_lesions_per_class: int = 4) -> None:
    """Enough images for every class to have its lesions (a 3-way split needs 3 per class)."""
    least = len(CLASSES) * min_lesions_per_class
    if not least <= n <= MAX_N:
        raise SynthError(f"The number of synthetic images (--n, data.synth_n) must be in "
                         f"[{least}, {MAX_N}], so that each of the {len(CLASSES)} classes has "
                         f"{min_lesions_per_class} lesions. Got {n} instead.")


def synth_metadata(n: int, seed: int = 0, min_lesions_per_class: int = 4) -> pd.DataFrame:
    """Metadata rows for ``n`` images: lesions of 1-3 images, all 7 classes, nv the majority."""
    check_n(n, min_lesions_per_class)
    rng = np.random.default_rng(seed)
    rows = []
    image_no = 24306
    lesion_no = 0
    # a floor of lesions per class first (round robin), then the rest by the class weights
    floor = list(CLASSES) * min_lesions_per_class
    while len(rows) < n:
        dx = floor.pop(0) if floor else CLASSES[rng.choice(len(CLASSES), p=CLASS_WEIGHTS)]
        lesion_no += 1
        age = float(rng.integers(4, 18) * 5)
        sex = str(rng.choice(["male", "female"]))
        loc = str(rng.choice(LOCALIZATIONS))
        # the floor's lesions all fit in n: while some are still to come, keep room for them
        room = n - len(rows) - len(floor)
        for _ in range(max(1, min(int(rng.integers(1, 4)), room))):
            rows.append({
                "lesion_id": f"HAM_{lesion_no:07d}", "image_id": f"ISIC_{image_no:07d}",
                "dx": dx, "dx_type": "histo", "age": age, "sex": sex, "localization": loc,
            })
            image_no += 1
    return pd.DataFrame(rows)


def render_lesion(dx: str, lesion_seed: int, view_seed: int, size: tuple[int, int]) -> Image.Image:
    """One image of a lesion: the lesion's look is fixed by ``lesion_seed``, the view jittered."""
    width, height = size
    lrng = np.random.default_rng(lesion_seed)
    vrng = np.random.default_rng(view_seed)
    skin = np.array([225, 180, 150]) + lrng.normal(0, 12, 3)
    color, scale, texture = APPEARANCE[dx]
    color = np.array(color) + lrng.normal(0, 10, 3)
    rx = width * scale * lrng.uniform(0.8, 1.2)
    ry = rx * lrng.uniform(0.7, 1.0)
    cx = width / 2 + vrng.normal(0, width * 0.04)
    cy = height / 2 + vrng.normal(0, height * 0.04)

    base = np.ones((height, width, 3)) * skin
    base += vrng.normal(0, 4, (height, width, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=max(1.0, width / 100)))
    tex = vrng.normal(0, texture, (height, width, 1))
    lesion = np.clip(np.ones((height, width, 3)) * color + tex, 0, 255).astype(np.uint8)
    img.paste(Image.fromarray(lesion), (0, 0), mask)
    return img


def write_synth_dataset(dest: str | Path, n: int = 280, seed: int = 0,
                        size: tuple[int, int] = (200, 150)) -> Path:
    """Write ``DEST/HAM10000_metadata.csv`` and JPEGs in the Dataverse two-part layout."""
    dest = Path(dest)
    check_n(n)
    if dest.exists() and not dest.is_dir():
        raise SynthError(f"--dest {dest} is a file; pass a folder (it is created if missing).")
    frame = synth_metadata(n, seed)
    for part in PART_DIRS:
        (dest / part).mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(frame.itertuples(index=False)):
        lesion_seed = seed * 1_000_003 + int(row.lesion_id[4:])
        view_seed = seed * 1_000_003 + int(row.image_id[5:])
        img = render_lesion(row.dx, lesion_seed, view_seed, size)
        img.save(dest / PART_DIRS[i % 2] / f"{row.image_id}.jpg", quality=90)
    storage.write_text(str(dest / METADATA_NAME), frame.to_csv(index=False))
    logger.info("wrote %d synthetic images to %s", len(frame), dest)
    return dest / METADATA_NAME
