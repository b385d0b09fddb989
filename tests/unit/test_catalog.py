import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.data.catalog import (
    build_catalog,
    build_manifest,
    manifest_config,
    read_manifest,
    split_frame,
    validate_metadata,
    write_manifest,
)
from dermray.data.synth import synth_metadata
from dermray.domain import CLASSES, SPLITS
from dermray.errors import CatalogError


def _write(tmp_path: Path, frame: pd.DataFrame, images: list[str]) -> tuple[Path, Path]:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for image_id in images:
        if not image_id.startswith("ISIC_"):
            continue
        Image.new("RGB", (8, 6), (120, 80, 60)).save(img_dir / f"{image_id}.jpg")
    csv = tmp_path / "meta.csv"
    frame.to_csv(csv, index=False)
    return csv, img_dir


def _frame(n=30):
    return synth_metadata(n, seed=1)


def test_valid_catalog_has_paths(tmp_path):
    frame = _frame()
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist())
    cat = build_catalog(str(csv), [str(img_dir)])
    assert len(cat.frame) == len(frame)
    assert all(Path(p).is_file() for p in cat.frame["path"])
    assert sum(cat.class_counts.values()) == len(frame)


def test_every_problem_reported_at_once(tmp_path):
    frame = _frame()
    frame.loc[2, "dx"] = "melanoma"
    frame.loc[3, "image_id"] = "../etc/passwd"
    frame.loc[4, "image_id"] = frame.loc[5, "image_id"]
    frame.loc[6, "lesion_id"] = ""
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist()[:-3])
    with pytest.raises(CatalogError) as err:
        build_catalog(str(csv), [str(img_dir)])
    problems = err.value.problems
    text = "\n".join(problems)
    assert "field 'dx' outside the 7 classes" in text and "line 4 ('melanoma')" in text
    assert "field 'image_id' must be 'ISIC_' followed by 7 digits" in text
    assert "'../etc/passwd'" in text
    assert "duplicate 'image_id' at line 7" in text
    assert "empty 'lesion_id' at line 8" in text
    assert "3 listed image(s) missing" in text
    assert len(problems) == 5


def test_missing_columns(tmp_path):
    frame = _frame().drop(columns=["dx", "age"])
    csv, img_dir = _write(tmp_path, frame, [])
    with pytest.raises(CatalogError, match=r"missing column\(s\) dx, age"):
        build_catalog(str(csv), [str(img_dir)])


def test_lesion_with_two_diagnoses():
    frame = _frame()
    lesion = frame["lesion_id"].value_counts().index[0]
    rows = frame.index[frame["lesion_id"] == lesion]
    frame.loc[rows[0], "dx"] = "mel"
    frame.loc[rows[1], "dx"] = "nv"
    assert any(lesion in p and "more than one 'dx'" in p for p in validate_metadata(frame))


def test_missing_images_list_count_and_first_ten(tmp_path):
    frame = _frame(60)
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist()[:10])
    with pytest.raises(CatalogError) as err:
        build_catalog(str(csv), [str(img_dir)])
    (msg,) = err.value.problems
    assert msg.startswith(f"{len(frame) - 10} listed image(s) missing")
    assert f"(and {len(frame) - 20} more)" in msg


def test_unlisted_images_are_a_warning(tmp_path):
    frame = _frame()
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist() + ["ISIC_9999999"])
    cat = build_catalog(str(csv), [str(img_dir)])
    assert any("ISIC_9999999" in w for w in cat.warnings)


def test_layouts_dataverse_and_kaggle(synth_dir, tmp_path):
    # Dataverse: found beside the metadata with no --images
    cat = build_catalog(str(synth_dir / "HAM10000_metadata.csv"))
    assert len(cat.image_dirs) == 2 and len(cat.frame) == 140
    # Kaggle: upper- and lower-case copies of both parts; the repeats are a warning
    kaggle = tmp_path / "kaggle"
    shutil.copytree(synth_dir, kaggle)
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.copytree(kaggle / part, kaggle / part.lower())
    cat = build_catalog(str(kaggle / "HAM10000_metadata.csv"), [str(kaggle)])
    assert len(cat.image_dirs) == 4
    assert any("more than one folder" in w for w in cat.warnings)
    with pytest.raises(CatalogError, match="does not exist"):
        build_catalog(str(kaggle / "HAM10000_metadata.csv"), [str(tmp_path / "nope")])


def _check_split(frame: pd.DataFrame, tol_pp: float) -> None:
    per_lesion = frame.groupby("lesion_id")["split"].nunique()
    assert (per_lesion == 1).all(), "a lesion is in two splits"
    overall = frame["dx"].value_counts(normalize=True)
    for split in SPLITS:
        part = frame[frame["split"] == split]
        assert set(part["dx"]) == set(CLASSES), f"{split} misses a class"
        share = part["dx"].value_counts(normalize=True)
        assert (share - overall).abs().max() * 100 <= tol_pp


def test_split_properties_on_synthetic_metadata():
    frame = synth_metadata(3000, seed=4)
    a = split_frame(frame, seed=11)
    _check_split(a, tol_pp=2.0)
    sizes = a["split"].value_counts(normalize=True)
    assert abs(sizes["train"] - 0.70) < 0.02 and abs(sizes["test"] - 0.15) < 0.02
    assert a["split"].equals(split_frame(frame, seed=11)["split"])
    assert not a["split"].equals(split_frame(frame, seed=12)["split"])


def test_split_needs_three_lesions_per_class():
    frame = synth_metadata(60, seed=0)
    vasc = frame["lesion_id"][frame["dx"] == "vasc"].unique()
    frame = frame[~frame["lesion_id"].isin(vasc[2:])]
    with pytest.raises(CatalogError, match="Class 'vasc' has only 2 lesion"):
        split_frame(frame)


def test_manifest_roundtrip(synth_manifest):
    frame = read_manifest(str(synth_manifest))
    assert list(frame.columns) == ["image_id", "lesion_id", "dx", "label", "split", "path", "age",
                                   "sex", "localization"]
    assert (frame["label"] == frame["dx"].map(CLASSES.index)).all()
    assert manifest_config(str(synth_manifest))["seed"] == 0
    assert frame.groupby("lesion_id")["split"].nunique().max() == 1


def test_manifest_is_deterministic(synth_dir, tmp_path):
    cat = build_catalog(str(synth_dir / "HAM10000_metadata.csv"))
    a = build_manifest(cat, (0.7, 0.15, 0.15), seed=5)
    write_manifest(a, str(tmp_path), {"seed": 5})
    b = read_manifest(str(tmp_path / "manifest.parquet"))
    pd.testing.assert_frame_equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))


def test_read_manifest_errors(tmp_path):
    with pytest.raises(CatalogError, match="dermray data split"):
        read_manifest(str(tmp_path / "missing.parquet"))


def test_synthetic_classes_are_learnable(synth_dir):
    """Mean colour per image separates the classes on held-out lesions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cat = build_catalog(str(synth_dir / "HAM10000_metadata.csv"))
    frame = split_frame(cat.frame, seed=0)
    feats = np.stack([np.asarray(Image.open(p), dtype=float)[12:36, 16:48].reshape(-1, 3)
                      .mean(0) for p in frame["path"]])
    train = (frame["split"] == "train").to_numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(feats[train], frame["dx"][train])
    assert clf.score(feats[~train], frame["dx"][~train]) > 0.8
    assert frame.groupby("lesion_id").size().max() > 1


def test_header_only_metadata_is_refused(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    with pytest.raises(CatalogError, match="a header but no rows") as err:
        build_catalog(str(csv), [str(tmp_path)])
    assert err.value.counts == {"no rows": 0}


def test_a_class_absent_or_too_small_is_refused_at_validate_time(tmp_path):
    frame = _frame(60)
    vasc = frame["lesion_id"][frame["dx"] == "vasc"].unique()
    frame = frame[~frame["lesion_id"].isin(vasc[2:])]  # vasc keeps 2 lesions
    frame = frame[frame["dx"] != "df"].reset_index(drop=True)  # df: none
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist())
    with pytest.raises(CatalogError) as err:
        build_catalog(str(csv), [str(img_dir)])
    text = "\n".join(err.value.problems)
    assert "no row of class(es) df" in text and "fewer than 3 lesions: vasc (2)" in text
    assert err.value.counts == {"class absent": 1, "class with too few lesions": 1}


def test_implausible_age_sex_localization_are_warnings_with_lines(tmp_path):
    frame = _frame()
    frame["age"] = frame["age"].astype(object)
    frame.loc[1, "age"], frame.loc[2, "age"], frame.loc[3, "age"] = -4, 130, "forty"
    frame.loc[4, "sex"], frame.loc[5, "sex"] = "m", " Female "
    frame.loc[6, "localization"] = "elbow"
    csv, img_dir = _write(tmp_path, frame, frame["image_id"].tolist())
    cat = build_catalog(str(csv), [str(img_dir)])
    summary = cat.summary()
    assert summary["problem_counts"] == {"implausible age": 3, "sex not in the HAM10000 list": 1,
                                         "localization not in the HAM10000 list": 1}
    assert summary["rows"] == len(frame) == summary["rows_clean"] + summary["rows_reported"]
    assert summary["rows_reported"] == 5
    lines = {p.kind: p.lines for p in cat.problems}  # CSV lines: the header is line 1
    assert lines["implausible age"] == (3, 4, 5) and lines["sex not in the HAM10000 list"] == (6,)
    kept = cat.frame.set_index("image_id")
    ids = frame["image_id"]
    assert kept.loc[ids[1:4], "age"].isna().all()
    assert kept.loc[ids[4], "sex"] == "unknown" and kept.loc[ids[5], "sex"] == "female"
    assert kept.loc[ids[6], "localization"] == "unknown"
