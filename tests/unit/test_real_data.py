"""The real HAM10000 files in ../shared (skipped where they are absent)."""

import numpy as np
import pandas as pd
from PIL import Image

from dermray.data.catalog import build_catalog, build_manifest, read_metadata, validate_metadata
from dermray.domain import CLASSES, SPLITS

OFFICIAL_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142,
                   "df": 115}


def test_official_metadata(ham):
    frame = read_metadata(str(ham / "HAM10000_metadata.csv"))
    assert len(frame) == 10015
    assert frame["lesion_id"].nunique() == 7470
    assert frame["dx"].value_counts().to_dict() == OFFICIAL_COUNTS
    assert validate_metadata(frame) == []


def test_200x150_folder_split(ham):
    cat = build_catalog(str(ham / "metadata_images_200x150.csv"), [str(ham / "images_200x150")])
    assert len(cat.frame) == 8597
    manifest = build_manifest(cat, (0.7, 0.15, 0.15), seed=0)
    assert manifest.groupby("lesion_id")["split"].nunique().max() == 1
    overall = manifest["dx"].value_counts(normalize=True)
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        assert set(part["dx"]) == set(CLASSES)
        share = part["dx"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.02
    sizes = manifest["split"].value_counts()
    assert abs(sizes["train"] / len(manifest) - 0.7) < 0.01


def test_full_size_originals_decode(ham):
    labels = ham / "originals_600x450_labels.csv"
    cat = build_catalog(str(labels), [str(ham / "originals_600x450")])
    assert len(cat.frame) == 71
    assert set(cat.frame["dx"]) == set(CLASSES)
    for path in cat.frame["path"]:
        with Image.open(path) as img:
            assert img.size == (600, 450)
            arr = np.asarray(img.convert("RGB"))
            assert arr.shape == (450, 600, 3) and arr.std() > 5
    assert pd.read_csv(labels)["image_id"].tolist() == cat.frame["image_id"].tolist()
