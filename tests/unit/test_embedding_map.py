"""The embedding map: one point per image (views averaged), PCA fitted on train, classes that
differ in feature space land apart, and the PNG / SVG / CSV are written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.embeddings import backbone_dir, to_table
from dermray.report.embedding_map import embedding_map, project, write_embedding_map


@pytest.fixture()
def out(tmp_path):
    """Embeddings of 7 classes x 6 images x 2 views: each class a blob around its own centre."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (len(CLASSES), 512))
    rows = []
    for c, dx in enumerate(CLASSES):
        for i in range(6):
            for view in (0, 1):
                rows.append({"image_id": f"ISIC_{c}{i:05d}", "lesion_id": f"HAM_{c}{i:05d}",
                             "dx": dx, "label": c, "split": ("train", "train", "train", "train",
                                                             "val", "test")[i],
                             "aug_index": view, "age": 50.0, "sex": "male",
                             "localization": "back"})
    frame = pd.DataFrame(rows)
    X = centres[frame["label"]] + rng.normal(0, 0.5, (len(frame), 512))
    for split, part in frame.groupby("split"):
        storage.write_parquet(to_table(part, X[part.index], "resnet50"),
                              storage.join(backbone_dir(tmp_path, "resnet50"), f"split={split}",
                                           "part-0.parquet"))
    return tmp_path


def test_one_point_per_image_and_the_classes_apart(out):
    coords, info = embedding_map(out, "resnet50")
    assert len(coords) == 42 and coords["image_id"].is_unique  # views averaged
    assert list(coords.columns) == ["image_id", "dx", "split", "x", "y"]
    assert info["method"] == "pca" and sum(info["explained_variance"]) <= 1
    centres = coords.groupby("dx")[["x", "y"]].mean()
    spread = coords.groupby("dx")[["x", "y"]].std().to_numpy().max()
    gaps = [np.linalg.norm(centres.iloc[i] - centres.iloc[j])
            for i in range(7) for j in range(i + 1, 7)]
    assert np.median(gaps) > spread  # blobs apart in the map as in feature space


def test_the_map_files_are_written(out):
    record = write_embedding_map(out, "resnet50", max_points=20)
    with Image.open(out / "embedding_map.png") as png:
        assert png.format == "PNG"
    assert (out / "embedding_map.svg").read_text().lstrip().startswith("<?xml")
    written = pd.read_csv(out / "embedding_map.csv")
    assert len(written) == record["points"] <= 21 and set(written["dx"]) == set(CLASSES)


def test_bad_method_and_missing_umap_are_messages():
    with pytest.raises(DermrayError, match="must be one of pca, umap"):
        project(np.zeros((5, 3)), "tsne")
    pytest.importorskip("sklearn")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(DermrayError, match="pip install umap-learn"):
            project(np.zeros((5, 3)), "umap")


def test_the_report_section_is_drawn_once_and_empty_without_embeddings(out, tmp_path_factory):
    from dermray.report.embedding_map import html_section, markdown_section

    lines = markdown_section(out, "resnet50+meta")
    assert "![embedding map](embedding_map.png)" in lines
    drawn = (out / "embedding_map.png").stat().st_mtime_ns
    assert html_section(out, "resnet50").startswith("<h2>Embedding map</h2>")
    assert (out / "embedding_map.png").stat().st_mtime_ns == drawn  # unchanged inputs: kept
    assert markdown_section(tmp_path_factory.mktemp("empty")) == []
