"""The extraction job on a local Ray: schema, counts, quarantine, fault tolerance, resume."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dermray.config import DataConfig, ExtractConfig
from dermray.embeddings import backbone_dir, embedding_schema, load_embeddings, read_frame
from dermray.extract import run_extract
from dermray.pipeline import run_split

BACKBONES = ("resnet50", "vgg19")


def _damage(dataset: Path) -> dict[str, str]:
    """Break some images and give others odd modes; returns image_id -> what was done."""
    files = sorted(dataset.glob("HAM10000_images_part_*/*.jpg"))
    done = {}
    files[0].write_bytes(np.random.default_rng(0).bytes(500))
    done[files[0].stem] = "corrupt"
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    done[files[1].stem] = "truncated"
    files[2].write_text("lesion_id,image_id,dx\n")
    done[files[2].stem] = "text"
    Image.open(files[3]).convert("L").save(files[3], "JPEG")
    done[files[3].stem] = "gray"
    Image.open(files[4]).convert("CMYK").save(files[4], "JPEG")
    done[files[4].stem] = "cmyk"
    arr = np.asarray(Image.open(files[5]).convert("L")).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    files[5].write_bytes(buf.getvalue())
    done[files[5].stem] = "16-bit"
    Image.open(files[6]).convert("RGBA").save(buf := io.BytesIO(), "PNG")
    files[6].write_bytes(buf.getvalue())
    done[files[6].stem] = "rgba"
    return done


@pytest.fixture(scope="module")
def extracted(ray_local, synth_dir, tmp_path_factory):
    dataset = tmp_path_factory.mktemp("damaged")
    shutil.copytree(synth_dir, dataset, dirs_exist_ok=True)
    damage = _damage(dataset)
    out = tmp_path_factory.mktemp("extract_out")
    run_split(DataConfig(metadata=str(dataset / "HAM10000_metadata.csv"), out=str(out), seed=0))
    cfg = ExtractConfig(manifest=str(out / "manifest.parquet"), out=str(out), backbones=BACKBONES,
                        weights={b: "none" for b in BACKBONES}, image_size=32, batch_size=16,
                        augment=True, max_views_per_image=2, tta_views=1, jit_compile=False)
    record = run_extract(cfg)
    return out, cfg, record, damage, ray_local


def test_schema_counts_and_run_record(extracted):
    out, cfg, record, _, _ = extracted
    for name, dim in (("resnet50", 2048), ("vgg19", 512)):
        folder = backbone_dir(out, name)
        files = list(folder.rglob("*.parquet"))
        assert files and {f.parent.name for f in files} == {"split=train", "split=val", "split=test"}
        schema = pads.dataset(str(files[0])).schema
        assert schema.remove_metadata().equals(embedding_schema(dim))
        frame = read_frame(out, name)
        assert len(frame) == record["rows"][name]["rows"]
        assert (frame["backbone"] == name).all()
    on_disk = json.loads((out / "extract_run.json").read_text())
    assert on_disk["views_planned"] == record["views_planned"] > 140
    assert on_disk["weights"] == {"resnet50": "none", "vgg19": "none"}
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
    Xa, ya, fa = load_embeddings(out, "resnet50", split="val", average_views=True)
    assert len(fa) == frame["image_id"].nunique() and (fa["aug_index"] == 0).all()
    assert len(fa) * 2 == len(frame)


def test_resume_after_interruption(extracted):
    out, cfg, record, _, _ = extracted
    before = read_frame(out, "resnet50").set_index(["image_id", "aug_index"])
    parts = sorted((backbone_dir(out, "resnet50") / "split=train").glob("*.parquet"))
    for part in parts[: len(parts) // 2]:  # as if the job had died half way
        part.unlink()
    again = run_extract(cfg)
    assert 0 < again["views_pending_at_start"] < record["views_planned"]
    after = read_frame(out, "resnet50").set_index(["image_id", "aug_index"])
    assert sorted(after.index) == sorted(before.index)
    np.testing.assert_allclose(np.stack(after.loc[before.index, "embedding"]),
                               np.stack(before["embedding"]), atol=1e-4)
    noop = run_extract(cfg)
    assert noop["views_pending_at_start"] == 0 and noop["wall_s"] < 30
