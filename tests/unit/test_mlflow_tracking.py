"""The winner's bundle to MLflow, without Ray: into the winning trial's run (found by Tune's
trial name), into a run of its own when the trial was not tracked, and a tracking failure is a
warning that loses nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from dermray.stages import tracking

pytest.importorskip("mlflow")


def config(uri: str = "") -> SimpleNamespace:
    return SimpleNamespace(mlflow_tracking_uri=uri, experiment="heads", out="out")


@pytest.fixture
def bundle(tmp_path):
    folder = tmp_path / "model"
    (folder / "head").mkdir(parents=True)
    (folder / "bundle.json").write_text('{"trial_id": "abc123"}')
    (folder / "head" / "weights.npz").write_bytes(b"\0" * 10)
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
    assert files == {"model/bundle.json", "model/head"}
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
