"""`dermray predict --ray`: the Ray Data job gives the local path's probabilities (to 1e-5) for the
same images, streams its rows to Parquet, and names every file it skipped."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from dermray.cli import main
from dermray.models.bundle import load_bundle
from dermray.models.predict_io import expand_inputs, predict_files


def test_ray_predict_matches_the_local_path(searched, tmp_path, capsys):
    out, _ = searched
    manifest = pd.read_parquet(out / "manifest.parquet")
    quarantined = set(pd.read_parquet(out / "quarantine.parquet")["image_id"])
    good = manifest.loc[~manifest["image_id"].isin(quarantined), "path"].tolist()[:12]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in good[:9]:
        shutil.copy(path, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    listed = tmp_path / "more.txt"  # a list file: one path a line, comments skipped
    listed.write_text("# three more\n" + "\n".join(good[9:]) + "\n")
    preds = tmp_path / "preds.parquet"

    assert main(["predict", "--ray", "--model", str(out / "model"), "--out", str(preds),
                 "--batch-size", "4", str(folder), str(listed)]) == 0
    assert "broken.jpg: unreadable or not an image" in capsys.readouterr().err

    ray_rows = pd.read_parquet(preds).set_index("path").sort_index()
    local, problems = predict_files(load_bundle(out / "model"),
                                    expand_inputs([str(folder), *good[9:]]))
    local = local.set_index("path").sort_index()
    assert len(problems) == 1 and len(ray_rows) == len(local) == 12
    assert list(ray_rows.index) == list(local.index)
    cols = [c for c in local if c.startswith("p_")]
    diff = np.abs(ray_rows[cols].to_numpy(float) - local[cols].to_numpy(float)).max()
    assert diff < 1e-5, diff
    assert (ray_rows["dx"] == local["dx"]).all()
    assert (ray_rows["image_id"] == local["image_id"]).all()
