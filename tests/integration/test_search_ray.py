"""The head search on a local Ray with a smoke budget: every family tried, the winner is the
trial with the highest val accuracy, the bundle reproduces the reported metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermray.config import build_section
from dermray.errors import ConfigError, DermrayError
from dermray.models.bundle import load_bundle
from dermray.models.embeddings import load_activations
from dermray.models.features import embedding_features
from dermray.models.predict_io import predict_files
from dermray.report.evaluate import metrics


def test_every_family_tried_and_best_val_accuracy_wins(searched):
    out, summary = searched
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 5  # one per family: each family's first point
    assert set(trials["family"]) == {"logistic", "xgboost", "mlp", "finetune", "cached_cnn"}
    done = trials[trials["status"].isin(["done", "stopped early"])]
    best = done.sort_values(["val_accuracy", "val_balanced_accuracy"], ascending=False).iloc[0]
    result = json.loads((out / "metrics.json").read_text())
    assert result["trial_id"] == best["trial_id"]
    assert result["family"] == best["family"] == summary["winner"]["family"]
    for split in ("val", "test"):
        m = result[split]
        assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(m)
        assert set(m["per_class"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
        assert sum(map(sum, m["confusion_matrix"])) == m["n"]
    assert set(result["best_per_family"]) == {"logistic", "xgboost", "mlp", "finetune",
                                              "cached_cnn"}
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert list((out / "tune" / "heads").rglob("events.out.tfevents*")), "no TensorBoard logs"


def test_bundle_round_trip_reproduces_reported_metrics(searched):
    out, _ = searched
    bundle = load_bundle(out / "model")
    reported = json.loads((out / "metrics.json").read_text())
    if bundle.spec.family == "finetune":
        pytest.skip("the winner is the fine-tuned CNN (random on this data); covered by heads tests")
    X, y, frame = _inputs(out, bundle.spec.family, bundle.spec.features)
    recomputed = metrics(y, bundle.head.predict_proba(X))
    assert recomputed["accuracy"] == pytest.approx(reported["test"]["accuracy"], abs=1e-12)
    assert recomputed["confusion_matrix"] == reported["test"]["confusion_matrix"]
    # from the image files, through decode + embed, as `dermray predict` does
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("image_id")
    paths = [Path(manifest.loc[i, "path"]) for i in frame["image_id"][:12]]
    preds, problems = predict_files(bundle, paths, metadata=manifest)
    assert problems == [] and len(preds) == len(paths)
    direct = bundle.head.predict_proba(X[:12])
    got = preds[[f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, direct, atol=2e-3)


def _inputs(out: Path, family: str, features: str):
    """A family's test inputs as the search scored them."""
    if family == "cached_cnn":
        return load_activations(out, features, "test", views="original")
    return embedding_features(out, features, "test")


def test_cached_cnn_bundle_predicts_from_image_files(searched, tmp_path):
    """A cached fine-tune head, exported as the search exports its winner: from the image files
    (decode, the frozen trunk up to the cut, the trained block) it gives the probabilities it
    gives on the cached maps."""
    from dermray.models.heads.cached import CachedFinetuneHead
    from dermray.stages.select import export_bundle

    out, _ = searched
    X_tr, y_tr, _ = load_activations(out, "resnet50_c5b2", "train")
    head = CachedFinetuneHead(weights="none", epochs=1).fit(X_tr, y_tr)
    X, y, frame = load_activations(out, "resnet50_c5b2", "test", views="original")
    proba = head.predict_proba(X)
    trials = pd.read_csv(out / "trials.csv")
    row = trials[trials["family"] == "cached_cnn"].iloc[0]
    cfg = build_section("search", {"families": ["cached_cnn"], "out": str(out)})
    record = json.loads((out / "extract_run.json").read_text())
    export_bundle(head, row, cfg, record, {"test": metrics(y, proba)}, str(tmp_path))
    bundle = load_bundle(tmp_path / "model")
    assert [b.name for b in bundle.spec.backbones] == ["resnet50_c5b2"]
    assert bundle.spec.features == "resnet50_c5b2"
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("image_id")
    paths = [Path(manifest.loc[i, "path"]) for i in frame["image_id"][:8]]
    preds, problems = predict_files(bundle, paths)
    assert problems == [] and len(preds) == 8
    got = preds[[f"p_{c}" for c in bundle.labels]].to_numpy()
    np.testing.assert_allclose(got, proba[:8], atol=2e-3)


def test_bad_search_configs():
    with pytest.raises(ConfigError, match="search.families must be one of"):
        build_section("search", {"families": ["svm"]})
    with pytest.raises(ConfigError, match="search.families must be a non-empty list"):
        build_section("search", {"families": []})
    with pytest.raises(ConfigError, match="search.features must be non-empty"):
        build_section("search", {"features": []})
    with pytest.raises(ConfigError, match="Feature spec 'alexnet'"):
        build_section("search", {"features": ["alexnet"]})


def test_split_missing_a_class_is_a_clear_error(extracted, monkeypatch):
    from dermray.stages import search
    from dermray.stages.search import load_search_data

    out, *_ = extracted
    cfg = build_section("search", {"out": str(out), "families": ["logistic"],
                                   "features": ["resnet50"]})
    real = search.embedding_features

    def without_vasc(o, spec, split):
        X, y, frame = real(o, spec, split)
        keep = (y != 6) if split == "val" else np.ones(len(y), bool)
        return X[keep], y[keep], frame[keep]

    monkeypatch.setattr(search, "embedding_features", without_vasc)
    with pytest.raises(DermrayError, match=r"val split of 'resnet50' lacks class\(es\) vasc"):
        load_search_data(cfg, str(out / "manifest.parquet"))


def test_predict_command_skips_a_bad_file(searched, tmp_path, capsys):
    import shutil

    from dermray.cli import main

    out, _ = searched
    manifest = pd.read_parquet(out / "manifest.parquet")
    quarantined = set(pd.read_parquet(out / "quarantine.parquet")["image_id"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in manifest.loc[~manifest["image_id"].isin(quarantined), "path"][:3]:
        shutil.copy(path, folder)
    (folder / "notes.jpg").write_text("not an image")
    csv = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(out / "model"), "--out", str(csv), str(folder)]) == 0
    preds = pd.read_csv(csv)
    assert len(preds) == 3 and set(preds["dx"]) <= {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert "notes.jpg" in capsys.readouterr().err


@pytest.mark.slow  # two searches back to back (30 s): run with -m slow
def test_deterministic_mode_repeats_the_trial_sequence(extracted, tmp_path):
    """search.deterministic: suggestions in batches of max_concurrent, each batch waiting for
    the last, no early stopping; two runs (two experiments) give the same trials and numbers."""
    from dermray.stages.search import run_search

    out, *_ = extracted
    runs = []
    for name in ("det_a", "det_b"):
        cfg = build_section("search", {"families": ["logistic"], "features": ["resnet50"],
                                       "num_samples": 5, "max_concurrent": 2,
                                       "seed_each_family": False, "deterministic": True,
                                       "out": str(out), "experiment": name,
                                       # not OUT/tune: other tests count its experiments
                                       "storage_path": str(tmp_path / "tune")})
        grid = run_search(cfg, str(out / "manifest.parquet"))
        runs.append(sorted((json.dumps(r.config, sort_keys=True),
                            r.metrics["val_accuracy"]) for r in grid))
    # TPE starts after 4 random trials: trial 5 sees all 4 results in both runs
    assert len(runs[0]) == 5 and runs[0] == runs[1]


def test_time_budget_caps_the_search(extracted, tmp_path):
    """search.time_budget_minutes: Tune starts no trial after the budget, so far fewer than
    num_samples run, and the search still ends normally with the trials that reported."""
    import time

    from dermray.stages.search import run_search

    out, *_ = extracted
    cfg = build_section("search", {"families": ["logistic"], "features": ["resnet50"],
                                   "num_samples": 200, "max_concurrent": 2,
                                   "time_budget_minutes": 0.1, "out": str(out),
                                   "experiment": "budget", "storage_path": str(tmp_path / "tune")})
    start = time.monotonic()
    grid = run_search(cfg, str(out / "manifest.parquet"))
    assert len(grid) < 200 and not grid.errors
    assert time.monotonic() - start < 180


def test_time_budget_is_refused_with_deterministic():
    with pytest.raises(ConfigError, match="time_budget_minutes"):
        build_section("search", {"time_budget_minutes": 5, "deterministic": True})
