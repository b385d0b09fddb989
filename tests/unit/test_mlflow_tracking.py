"""The winner's bundle to MLflow, without Ray: into the winning trial's run (found by Tune's
trial name), into a run of its own when the trial was not tracked, and a tracking failure is a
warning that loses nothing. The bundle is an MLflow pyfunc model: loaded from a file store with
``mlflow.pyfunc.load_model('runs:/<run>/model')``, its ``predict`` on a DataFrame of image paths
gives the rows of `dermray predict`'s local path (issue 20)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.data.synth import render_lesion
from dermray.domain import CLASSES
from dermray.models.bundle import BackboneRecord, BundleSpec, expected_inputs, load_bundle
from dermray.models.heads import make_head
from dermray.models.policies import fit_operating_points
from dermray.models.predict_io import predict_files
from dermray.stages import tracking

pytest.importorskip("mlflow")
SIZE = 32


def config(uri: str = "") -> SimpleNamespace:
    return SimpleNamespace(mlflow_tracking_uri=uri, experiment="heads", out="out")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A logistic bundle on vgg19 (seeded random weights) with operating points, as exported."""
    folder = tmp_path_factory.mktemp("out") / "model"
    spec = BundleSpec(family="logistic", features="vgg19", image_size=SIZE, tta_views=0, seed=0,
                      backbones=(BackboneRecord.of("vgg19", "none"),), params={},
                      trial_id="abc123", metrics={})
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(CLASSES)), 10)
    X = rng.normal(size=(len(y), expected_inputs(spec))) + y[:, None] * 0.05
    head = make_head("logistic", {"C": 1.0}).fit(X, y)
    points = fit_operating_points(head.predict_proba(X), y, np.bincount(y) / len(y),
                                  {"melanoma_target": 0.9})
    head.save(folder / "head")
    BundleSpec(**{**spec.__dict__, "operating_points": points}).write(folder)
    return folder


def test_off_does_nothing(bundle):
    assert tracking.log_winner_bundle(config(), "abc123", str(bundle)) is None


def test_the_winners_run_gets_the_bundle_and_the_tag(tmp_path, bundle):
    from mlflow.tracking import MlflowClient

    cfg = config((tmp_path / "mlruns").as_uri())
    tracking._prepare(cfg.mlflow_tracking_uri)
    client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
    exp = client.create_experiment(tracking.experiment_name(cfg))
    runs = {tid: client.create_run(exp, tags={"trial_name": f"train_head_{tid}"}).info.run_id
            for tid in ("abc123", "def456")}
    result = {"val": {"accuracy": 0.9, "balanced_accuracy": 0.8},
              "test": {"accuracy": 0.85, "balanced_accuracy": 0.75, "macro_f1": 0.7,
                       "confusion_matrix": [[1]]},
              "operating_points": {"temperature": 1.5, "policies": {"melanoma": {
                  "threshold": 0.2, "target_sensitivity": 0.9}}},
              "policies": {"test": {"ece_before": 0.1, "ece_after": 0.05, "policies": {
                  "melanoma": {"accuracy": 0.7, "melanoma_sensitivity": 0.91,
                               "recall": {"mel": 0.91, "nv": 0.6}}}}}}
    run_id = tracking.log_winner_bundle(cfg, "abc123", str(bundle), result)
    assert run_id == runs["abc123"]
    logged = client.get_run(run_id).data.metrics
    assert logged == {"val_accuracy": 0.9, "val_balanced_accuracy": 0.8, "test_accuracy": 0.85,
                      "test_balanced_accuracy": 0.75, "test_macro_f1": 0.7,
                      "test_ece_before": 0.1, "test_ece_after": 0.05,
                      "test_melanoma_accuracy": 0.7, "test_melanoma_melanoma_sensitivity": 0.91,
                      "test_melanoma_recall_mel": 0.91, "test_melanoma_recall_nv": 0.6}
    assert client.get_run(run_id).data.tags[tracking.WINNER_TAG] == "true"
    assert tracking.WINNER_TAG not in client.get_run(runs["def456"]).data.tags
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= files
    assert {f.path for f in client.list_artifacts(run_id, "model/artifacts/bundle")} == {
        "model/artifacts/bundle/bundle.json", "model/artifacts/bundle/head"}
    points = client.download_artifacts(run_id, "operating_points.json", str(tmp_path))
    assert json.loads(Path(points).read_text())["policies"]["melanoma"]["threshold"] == 0.2
    # a trial the search did not track (resumed from before tracking was on): a run of its own
    other = tracking.log_winner_bundle(cfg, "zzz999", str(bundle))
    assert other not in runs.values()
    assert client.get_run(other).data.tags["trial_name"] == "winner_zzz999"


def test_a_tracking_failure_is_a_warning(tmp_path, bundle, monkeypatch, caplog):
    def down(*args):
        raise ConnectionError("server down")

    monkeypatch.setattr(tracking, "_log_bundle", down)
    with caplog.at_level(logging.WARNING, logger="dermray.stages.tracking"):
        assert tracking.log_winner_bundle(config("http://127.0.0.1:9"), "abc123",
                                          str(bundle)) is None
    assert "server down" in caplog.text


def test_trial_metrics_are_dermrays_own_not_rays_bookkeeping():
    result = {"val_accuracy": 0.8, "val_log_loss": 0.5, "train_loss": 1.2, "pid": 1234,
              "timestamp": 1796281124, "time_this_iter_s": 0.3, "config/family": "mlp",
              "config/mlp_width": 256, "training_iteration": 3, "done": False, "final": True,
              "node_ip": "127.0.0.1"}
    assert tracking.own_metrics(result) == {"val_accuracy": 0.8, "val_log_loss": 0.5,
                                            "train_loss": 1.2}


def test_the_logged_model_loads_with_pyfunc_and_predicts_dermrays_rows(tmp_path, bundle):
    """An MLflow user's path: load_model('runs:/<run>/model'), predict on a DataFrame of paths
    (one unreadable), with a policy; the rows are those of predict_io's local loop (the one
    `dermray predict` runs), the unreadable file skipped as there."""
    import mlflow

    cfg = config((tmp_path / "mlruns").as_uri())
    tracking._prepare(cfg.mlflow_tracking_uri)
    run_id = tracking.log_winner_bundle(cfg, "abc123", str(bundle))
    paths = []
    for i, dx in enumerate(CLASSES[:4]):
        paths.append(tmp_path / f"ISIC_{i}.png")
        Image.fromarray(np.asarray(render_lesion(dx, i, i + 1, (SIZE, SIZE)))).save(paths[-1])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [str(p) for p in [*paths[:2], tmp_path / "broken.jpg", *paths[2:]]]
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    got = model.predict(pd.DataFrame({"path": paths}), params={"policy": "melanoma"})
    local = load_bundle(bundle)
    local._embedder = model.unwrap_python_model().bundle.embedder()  # one network build
    want, problems = predict_files(local, paths, policy="melanoma")
    assert len(problems) == 1 and len(got) == 4
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want)
    assert set(got["policy"]) == {"melanoma"}
