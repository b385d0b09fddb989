"""A tiny `dermray search` (on a copy of the session's embeddings, on the session's Ray) with its
progress written to a pseudo-terminal and MLflow tracking to a local file store: the progress
lines appear with their counts, each trial is an MLflow run with its parameters and metrics, and
the winner's run holds the exported bundle as an MLflow pyfunc model that predicts as `dermray
predict` does."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dermray.cli import main
from dermray.stages import progress

N_TRIALS = 2


class PtyReader:
    """The master side of a pseudo-terminal, drained by a thread (a full pty would block the
    writer)."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        self.stream = os.fdopen(slave, "w", buffering=1)
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the slave side was closed
                    return
                if not data:
                    return
                self.chunks.append(data)
            elif self.stream.closed:
                return

    def close(self) -> str:
        self.stream.close()
        self.thread.join(timeout=5)
        os.close(self.master)
        return b"".join(self.chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny_search(extracted, tmp_path_factory):
    src, *_ = extracted
    out = tmp_path_factory.mktemp("pty_search")
    for name in ("manifest.parquet", "extract_run.json"):
        shutil.copy(src / name, out / name)
    shutil.copytree(src / "embeddings", out / "embeddings")
    mlruns = tmp_path_factory.mktemp("mlruns")
    config = out / "search.yaml"
    config.write_text(yaml.safe_dump({"search": {
        "families": ["logistic"], "features": ["resnet50"], "num_samples": N_TRIALS,
        "max_concurrent": 2, "experiment": "pty", "mlflow_tracking_uri": mlruns.as_uri()}}))
    term = PtyReader()
    saved = progress.sys
    progress.sys = SimpleNamespace(stdout=term.stream)  # progress writes to the terminal
    try:
        code = main(["search", "--out", str(out), "--config", str(config)])
    finally:
        progress.sys = saved
        text = term.close()
    assert code == 0
    return out, mlruns, text


def test_progress_lines_in_a_pseudo_terminal(tiny_search):
    _, _, text = tiny_search
    assert "\r" in text  # the status line is redrawn in place on a terminal
    screen = [seg.replace("\x1b[2K", "") for line in text.splitlines()
              for seg in line.split("\r") if seg.strip()]
    trials = [ln for ln in screen if re.match(rf"trial \d+/{N_TRIALS} logistic on resnet50", ln)]
    assert len(trials) == N_TRIALS  # one line per finished trial, with its val accuracy
    assert all(re.search(r"val_accuracy \d\.\d{4}", ln) and ln.rstrip().endswith("]")
               for ln in trials)
    status = [ln for ln in screen if ln.startswith("search ")]
    assert any(re.search(r"\d+ running", ln) for ln in status)
    final = [ln for ln in screen if ln.startswith("search finished:")]
    assert final and re.search(rf"{N_TRIALS}/{N_TRIALS} trials: {N_TRIALS} done, 0 running",
                               final[-1])
    assert re.search(r"best val_accuracy \d\.\d{4} \(logistic on resnet50\)", final[-1])


def test_mlflow_runs_with_params_metrics_and_the_winners_bundle(tiny_search):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, mlruns, _ = tiny_search
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    exp = client.get_experiment_by_name("dermray-pty")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == N_TRIALS  # one MLflow run per trial
    for run in runs:
        assert run.data.params["family"] == "logistic"
        assert run.data.params["features"] == "resnet50"
        assert "logistic_C" in run.data.params
        assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0
        assert all(k.startswith(("val_", "train_", "test_")) for k in run.data.metrics), \
            sorted(run.data.metrics)  # no pid, timestamp, config/... from Ray's bookkeeping
    winners = [r for r in runs if r.data.tags.get("dermray.winner") == "true"]
    assert len(winners) == 1
    result = json.loads((out / "metrics.json").read_text())
    logged = winners[0].data.metrics
    assert logged["test_accuracy"] == result["test"]["accuracy"]
    assert logged["test_melanoma_melanoma_sensitivity"] == \
        result["policies"]["test"]["policies"]["melanoma"]["melanoma_sensitivity"]
    winner_id = json.loads((out / "metrics.json").read_text())["trial_id"]
    assert winners[0].data.tags["trial_name"].endswith(winner_id)
    run_id = winners[0].info.run_id
    files = {f.path for f in client.list_artifacts(run_id, "model/artifacts/bundle")}
    assert {f"model/artifacts/bundle/{f}" for f in ("bundle.json", "model_card.md", "head")} <= files
    local = client.download_artifacts(run_id, "model/artifacts/bundle/bundle.json")
    bundle = json.loads(Path(local).read_text())
    assert bundle["trial_id"] == winner_id


def test_the_winner_loads_as_an_mlflow_pyfunc_model_and_predicts_as_dermray(tiny_search,
                                                                           tmp_path):
    """An MLflow user's first call on the winner gives `dermray predict`'s rows."""
    mlflow = pytest.importorskip("mlflow")
    import pandas as pd

    out, mlruns, _ = tiny_search
    manifest = pd.read_parquet(out / "manifest.parquet")
    paths = [str(p) for p in manifest.query("split == 'test'")["path"].head(3)]
    mlflow.set_tracking_uri(mlruns.as_uri())
    run = mlflow.search_runs(experiment_names=["dermray-pty"],
                             filter_string="tags.`dermray.winner` = 'true'")
    model = mlflow.pyfunc.load_model(f"runs:/{run['run_id'].iloc[0]}/model")
    got = model.predict(pd.DataFrame({"path": paths}), params={"policy": "melanoma"})
    csv = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(out / "model"), "--no-ray", "--policy", "melanoma",
                 "--out", str(csv), *paths]) == 0
    want = pd.read_csv(csv)
    assert list(got.columns) == list(want.columns)
    assert got["path"].tolist() == want["path"].tolist()
    assert got["dx"].tolist() == want["dx"].tolist()
    probs = [c for c in want.columns if c.startswith("p_")]
    assert (got[probs] - want[probs]).abs().to_numpy().max() < 1e-5  # the CSV's 5 decimals
