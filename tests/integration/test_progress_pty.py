"""A tiny `dermray search` (on a copy of the session's embeddings, on the session's Ray) with
everything this process writes (its stdout and stderr, Python's and the C++ libraries' alike)
going to an 80-column pseudo-terminal, and MLflow tracking to a local file store: the progress
lines appear with their counts; every line on the terminal is dermray's and fits in 80 columns;
the closing summary names report.html; the other libraries' logs are in OUT/logs; each trial is
an MLflow run with its parameters and metrics, and the winner's run holds the exported bundle as
an MLflow pyfunc model that predicts as `dermray predict` does."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import sys
import termios
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from dermray.cli import main

N_TRIALS = 2
COLUMNS = 80


class PtyReader:
    """The master side of a pseudo-terminal, drained by a thread (a full pty would block the
    writer)."""

    def __init__(self, columns: int = COLUMNS) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
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
    # the terminal is this process's fds 1 and 2 (what Ray's and TensorFlow's C++ code writes
    # to) and Python's sys.stdout / sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(term.stream.fileno(), 1)
        os.dup2(term.stream.fileno(), 2)
        with redirect_stdout(term.stream), redirect_stderr(term.stream):
            code = main(["search", "--out", str(out), "--config", str(config)])
    finally:
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        text = term.close()
    assert code == 0, text[-3000:]
    return out, mlruns, text


def screen(text: str) -> list[str]:
    """What the terminal showed, line by line: every line and every in-place redraw of the
    status line (``\r``), a wrapped line's continuation (indented) joined back to it."""
    lines: list[str] = []
    for raw in text.splitlines():
        for seg in raw.split("\r"):
            seg = seg.replace("\x1b[2K", "")
            if not seg.strip():
                continue
            if seg.startswith("    ") and lines:
                lines[-1] += " " + seg.strip()
            else:
                lines.append(seg)
    return lines


# the starts of dermray's own lines: progress, its log lines, the closing summary
OWN = re.compile(r"(trial \d+/\d+ |search |info: |warning: |winner: |  |report: |model: |"
                 r"trials: |logs: |next:)")
# a foreign log line: a source file and line (Ray's `tune.py:1007 --`, `core_worker.cc:`, TF's
# `cpu_feature_guard.cc:`), glog's `I1203 ...`, or a library's name in brackets
FOREIGN = re.compile(r"\b\w+\.(py|cc|h):\d+\b|^[IWEF]\d{4} |\b(optuna|absl|tensorflow)\b",
                     re.IGNORECASE)


def test_every_line_on_the_terminal_is_dermrays_and_fits_80_columns(tiny_search):
    out, _, text = tiny_search
    pieces = [seg.replace("\x1b[2K", "") for raw in text.splitlines() for seg in raw.split("\r")]
    long = [p for p in pieces if len(p) > COLUMNS]
    assert not long, long  # every redraw of the status line too, not only what stays
    lines = screen(text)
    assert not [ln for ln in lines if FOREIGN.search(ln)], "\n".join(lines)
    assert all(OWN.match(ln) for ln in lines), [ln for ln in lines if not OWN.match(ln)]
    log = (out / "logs" / "dermray.log").read_text()  # where the other libraries' lines went
    assert re.search(r"^\S+ \S+ \w+ (ray|optuna)[.:]", log, re.MULTILINE), log[-3000:]


def test_the_search_ends_with_a_summary_naming_report_html(tiny_search):
    out, _, text = tiny_search
    lines = screen(text)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("winner: logistic on resnet50"))
    summary = lines[start:]
    assert f"report: {out / 'report.html'}" in summary
    assert any(ln.startswith("model: ") and ln.endswith(str(out / "model")) for ln in summary)
    assert (out / "report.html").is_file()
    assert any(ln.strip().startswith("dermray predict --model") for ln in summary)
    assert not any(ln.startswith("{") for ln in lines)  # a terminal gets no JSON blob


def test_progress_lines_in_a_pseudo_terminal(tiny_search):
    _, _, text = tiny_search
    assert "\r" in text  # the status line is redrawn in place on a terminal
    screen_lines = screen(text)
    trials = [ln for ln in screen_lines if re.match(rf"trial \d+/{N_TRIALS} logistic on resnet50", ln)]
    assert len(trials) == N_TRIALS  # one line per finished trial, with its val accuracy
    assert all(re.search(r"val_accuracy \d\.\d{4}", ln) and ln.rstrip().endswith("]")
               for ln in trials)
    status = [ln for ln in screen_lines if ln.startswith("search ")]
    assert any(re.search(r"\d+ running", ln) for ln in status)
    final = [ln for ln in screen_lines if ln.startswith("search finished:")]
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
