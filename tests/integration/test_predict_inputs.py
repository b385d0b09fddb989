"""`dermray predict` trusts no file: regular files only, bounded bytes and pixels, bounded batches,
a row per image carrying its path, a reason per skipped file, the same rows whatever the batch."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
from PIL import Image

from dermray.cli import main
from dermray.models.bundle import load_bundle
from dermray.models.predict_io import Limits, expand_inputs, predict_files


@pytest.fixture()
def folder(searched, tmp_path):
    out, _ = searched
    manifest = pd.read_parquet(out / "manifest.parquet")
    quarantined = set(pd.read_parquet(out / "quarantine.parquet")["image_id"])
    good = manifest.loc[~manifest["image_id"].isin(quarantined), "path"][:5].tolist()
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for path in good:
        shutil.copy(path, root / "a")
    twin = root / "b" / os.path.basename(good[0])  # the same file name in another folder
    shutil.copy(good[1], twin)
    os.mkfifo(root / "a" / "pipe.jpg")  # reading it would block for ever
    (root / "a" / "big.jpg").write_bytes(b"\xff" * 300_000)
    Image.new("RGB", (3000, 2000)).save(root / "a" / "huge.png")
    return out, root, good


def run_predict(out, root, csv, *flags):
    return main(["predict", "--model", str(out / "model"), "--out", str(csv), *flags, str(root)])


def test_hostile_files_are_skipped_with_their_reason(folder, tmp_path, capsys):
    out, root, good = folder
    csv = tmp_path / "preds.csv"
    assert run_predict(out, root, csv, "--max-bytes", "200000", "--max-pixels", "1000000",
                       "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "pipe.jpg: not a regular file" in err
    assert "big.jpg: 300000 bytes is over the limit of 200000 bytes" in err
    assert "huge.png: image of 3000x2000 pixels is over the limit of 1000000 pixels" in err
    preds = pd.read_csv(csv)
    # every image once, with its path: the two files named alike are two rows
    assert len(preds) == len(good) + 1 and preds["path"].is_unique
    assert preds["image_id"].value_counts().max() == 2
    assert "Traceback" not in err


def test_the_batch_size_does_not_change_the_rows(folder):
    out, root, _ = folder
    bundle = load_bundle(out / "model")
    files = expand_inputs([str(root)])
    small, skipped = predict_files(bundle, files, limits=Limits(batch_size=1))
    large, _ = predict_files(bundle, files, limits=Limits(batch_size=64))
    pd.testing.assert_frame_equal(small, large)
    assert len(small) + len(skipped) == len(files)  # every file is a row or a reason


def test_bad_limits_are_a_message(folder, tmp_path, capsys):
    out, root, _ = folder
    assert run_predict(out, root, tmp_path / "x.csv", "--batch-size", "0") == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
