"""The cached fine-tune with patient metadata through the whole path on a local Ray: the search
trains on resnet50_c5b2+meta, the selection scores and exports it, and the bundle predicts
from the image files (with the manifest's metadata) what the head gives on the search's rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermray.config import build_section
from dermray.models.bundle import load_bundle
from dermray.models.features import N_METADATA, activation_features
from dermray.models.predict_io import predict_files
from dermray.report.evaluate import metrics


@pytest.mark.slow  # a Ray search and an export (~1 min on 2 cores after the extraction)
def test_search_select_and_predict_with_metadata(extracted, tmp_path):
    from dermray.stages.search import run_search
    from dermray.stages.select import finish

    out, *_ = extracted
    cfg = build_section("search", {"families": ["cached_cnn"], "cached_cnn_meta": [True],
                                   "cached_cnn_epochs": 1, "num_samples": 1,
                                   "max_concurrent": 1, "out": str(out), "experiment": "meta",
                                   "storage_path": str(tmp_path / "tune")})
    manifest_path = str(out / "manifest.parquet")
    summary = finish(run_search(cfg, manifest_path), cfg, manifest_path, str(tmp_path))
    assert summary["winner"]["features"] == "resnet50_c5b2+meta"
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert list(trials["features"]) == ["resnet50_c5b2+meta"]
    bundle = load_bundle(tmp_path / "model", warn_random=False)
    assert bundle.uses_metadata and bundle.head.meta == N_METADATA
    X, y, frame = activation_features(out, "resnet50_c5b2+meta", "test")
    proba = bundle.head.predict_proba(X)
    reported = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert metrics(y, proba)["confusion_matrix"] == reported["confusion_matrix"]
    manifest = pd.read_parquet(manifest_path).set_index("image_id")
    ids = list(frame["image_id"][:8])
    preds, problems = predict_files(bundle, [Path(manifest.loc[i, "path"]) for i in ids],
                                    metadata=manifest)
    assert problems == []
    got = preds.set_index("image_id").loc[ids, [f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, proba[:8], atol=2e-3)
