"""The extraction job on a local Ray: schema, counts, quarantine, fault tolerance, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from dermray.errors import DermrayError
from dermray.models.embeddings import (
    backbone_dir,
    dataset,
    embedding_schema,
    load_activations,
    load_embeddings,
    read_frame,
)
from dermray.stages.extract import run_extract

BACKBONES = ("resnet50", "vgg19")


def test_schema_counts_and_run_record(extracted):
    out, _, record, _, _ = extracted
    for name, dim, kind in (("resnet50", 2048, pa.float32()), ("vgg19", 512, pa.float32()),
                            ("resnet50_c5b2", 2048, pa.float16())):  # the map: 1x1x2048 at 32
        folder = Path(backbone_dir(out, name))
        assert folder.parent.name == ("activations" if name == "resnet50_c5b2" else "embeddings")
        files = list(folder.rglob("*.parquet"))
        assert files and {f.parent.name for f in files} == {"split=train", "split=val", "split=test"}
        schema = pads.dataset(str(files[0])).schema
        assert schema.remove_metadata().equals(embedding_schema(dim, kind))
        frame = read_frame(out, name)
        assert len(frame) == record["rows"][name]["rows"]
        assert (frame["backbone"] == name).all()
    on_disk = json.loads((out / "extract_run.json").read_text())
    assert on_disk["views_planned"] == record["views_planned"] > 140
    assert on_disk["weights"] == {"resnet50": "none", "vgg19": "none", "resnet50_c5b2": "none"}
    assert on_disk["versions"]["ray"].startswith("2.")
    assert on_disk["images_per_s"] > 0


def test_bad_images_quarantined_odd_modes_converted(extracted):
    out, _, record, damage, _ = extracted
    q = pd.read_parquet(out / "quarantine.parquet")
    bad = {i for i, kind in damage.items() if kind in ("corrupt", "truncated", "text")}
    assert set(q["image_id"]) == bad
    reasons = dict(zip(q["image_id"], q["reason"]))
    assert all(reasons[i] for i in bad)
    truncated = next(i for i, k in damage.items() if k == "truncated")
    assert "truncated" in reasons[truncated]
    frame = read_frame(out, "resnet50")
    converted = {i for i, kind in damage.items() if kind in ("gray", "cmyk", "16-bit", "rgba")}
    assert converted <= set(frame["image_id"])
    for name in BACKBONES:  # views planned = rows written + views quarantined
        assert record["rows"][name]["rows"] + record["quarantined"] == record["views_planned"]


def test_killed_actor_retried_exact_rows(extracted):
    out, _, record, _, marker = extracted
    assert marker.exists(), "the fault hook did not fire"
    frame = read_frame(out, "vgg19")  # raises on duplicates
    assert len(frame) == record["views_planned"] - record["quarantined"]


def test_fusion_and_tta_average(extracted):
    out, _, _, _, _ = extracted
    X, y, frame = load_embeddings(out, ["resnet50", "vgg19"], split="val")
    assert X.shape == (len(frame), 2560) and len(y) == len(frame)
    _, _, fa = load_embeddings(out, "resnet50", split="val", average_views=True)
    assert len(fa) == frame["image_id"].nunique() and (fa["aug_index"] == 0).all()
    assert len(fa) * 2 == len(frame)


def test_resume_after_interruption(extracted):
    """Half the part files of an embedding and of the activation map lost: the rerun makes
    exactly those views again, with the same values; a third run has nothing to do."""
    out, cfg, record, _, _ = extracted
    before = read_frame(out, "resnet50").set_index(["image_id", "aug_index"])
    maps, _, map_rows = load_activations(out, "resnet50_c5b2", "train")
    for name in ("resnet50", "resnet50_c5b2"):
        parts = sorted((Path(backbone_dir(out, name)) / "split=train").glob("*.parquet"))
        for part in parts[: len(parts) // 2]:  # as if the job had died half way
            part.unlink()
    again = run_extract(cfg)
    assert 0 < again["views_pending_at_start"] < record["views_planned"]
    after = read_frame(out, "resnet50").set_index(["image_id", "aug_index"])
    assert sorted(after.index) == sorted(before.index)
    np.testing.assert_allclose(np.stack(after.loc[before.index, "embedding"]),
                               np.stack(before["embedding"]), atol=1e-4)
    maps_again, _, rows_again = load_activations(out, "resnet50_c5b2", "train")
    pd.testing.assert_frame_equal(rows_again, map_rows)
    assert maps_again.dtype == np.float16 and maps_again.shape == maps.shape
    np.testing.assert_allclose(maps_again.astype(np.float32), maps.astype(np.float32),
                               rtol=2e-3, atol=2e-3)  # float16: 3 significant digits
    noop = run_extract(cfg)
    assert noop["views_pending_at_start"] == 0 and noop["wall_s"] < 30


def test_rows_are_the_extractors_output_bit_for_bit(extracted):
    """OUT/embeddings and OUT/activations hold, per view, exactly what the frozen network
    computes for that decoded (and augmented) view in a direct call: the same bits, whatever
    batch the job put it in (a view's result does not depend on its batch neighbours or the
    padding, at a fixed batch size), for a sample of original and augmented views."""
    from dermray.data.augment import decode_batch
    from dermray.models.backbones import FrozenExtractor

    out, cfg, _, _, _ = extracted
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("image_id")
    maps, _, frame = load_activations(out, "resnet50_c5b2", "train")
    frame = frame.reset_index(drop=True)  # row i of the frame is maps[i]
    assert maps.shape[1:] == (1, 1, 2048) and maps.dtype == np.float16
    sample = pd.concat([frame[frame["aug_index"] == 0].head(3),
                        frame[frame["aug_index"] > 0].head(3)])
    assert (sample["aug_index"] > 0).sum() == 3
    batch = {"image_id": sample["image_id"].to_numpy(object),
             "path": manifest.loc[sample["image_id"], "path"].to_numpy(object),
             "split": sample["split"].to_numpy(object),
             "aug_index": sample["aug_index"].to_numpy(int)}
    images = decode_batch(batch, cfg.image_size, cfg.seed)["image"]
    ref = FrozenExtractor(list(cfg.backbones), dict(cfg.weights), cfg.image_size,
                          batch_size=cfg.batch_size, jit_compile=cfg.jit_compile,
                          seed=cfg.seed).embed_rows(
        images, {b: np.ones(len(images), bool) for b in cfg.backbones})
    np.testing.assert_array_equal(maps[sample.index].reshape(len(sample), -1),
                                  ref["resnet50_c5b2"].astype(np.float16))
    emb = dataset(backbone_dir(out, "resnet50")).to_table(
        columns=["image_id", "aug_index", "embedding"]).to_pandas().set_index(
        ["image_id", "aug_index"])
    keys = list(zip(sample["image_id"], sample["aug_index"]))
    np.testing.assert_array_equal(np.stack(emb.loc[keys, "embedding"]), ref["resnet50"])


def test_duplicate_views_are_refused_not_repaired(extracted):
    """A view written twice (under another part name) is never read or counted: reading it and
    the next extract refuse the folder (the way out: --fresh); nothing is deleted."""
    out, cfg, record, _, _ = extracted
    folder = Path(backbone_dir(out, "vgg19")) / "split=val"
    copy = folder / "part-zzzzcopy-by-a-second-run.parquet"
    shutil.copy(min(folder.glob("*.parquet")), copy)
    try:
        with pytest.raises(DermrayError, match="duplicate view"):
            read_frame(out, "vgg19")
        with pytest.raises(DermrayError, match="--fresh"):
            run_extract(cfg)  # nothing is pending: no Ray job, the reconciliation refuses
        assert copy.is_file()
    finally:
        copy.unlink()
    assert len(read_frame(out, "vgg19")) == record["rows"]["vgg19"]["rows"]


def test_driver_writes_when_asked(extracted, tmp_path):
    """write_from=driver (multi-node clusters): same rows and values as the actors wrote."""
    import dataclasses

    out, cfg, record, _, _ = extracted
    shutil.copy(out / "manifest.parquet", tmp_path / "manifest.parquet")
    driver_cfg = dataclasses.replace(cfg, out=str(tmp_path), manifest=str(tmp_path / "manifest.parquet"),
                                     backbones=("resnet50",), write_from="driver")
    again = run_extract(driver_cfg)
    assert again["actor_layout"]["writer"] == "driver"
    assert again["rows"]["resnet50"]["rows"] == record["rows"]["resnet50"]["rows"]
    a = read_frame(out, "resnet50").set_index(["image_id", "aug_index"])
    b = read_frame(tmp_path, "resnet50").set_index(["image_id", "aug_index"])
    np.testing.assert_allclose(np.stack(b.loc[a.index, "embedding"]), np.stack(a["embedding"]),
                               atol=1e-4)
