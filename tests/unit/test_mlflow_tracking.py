"""The winner's bundle to MLflow, without Ray: into the winning trial's run (found by Tune's
trial name), into a run of its own when the trial was not tracked, and a tracking failure is a
warning that loses nothing."""

from __future__ import annotations

import logging
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
    run_id = tracking.log_winner_bundle(cfg, "abc123", str(bundle))
    assert run_id == runs["abc123"]
    assert client.get_run(run_id).data.tags[tracking.WINNER_TAG] == "true"
    assert tracking.WINNER_TAG not in client.get_run(runs["def456"]).data.tags
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert files == {"model/bundle.json", "model/head"}
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
