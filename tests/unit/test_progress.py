"""Progress lines without Ray: the extraction counters and the Tune callback, on a fake terminal
and on a plain stream; counts and fields, not the exact text."""

from __future__ import annotations

import io
import pickle
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from dermray.stages import progress
from dermray.stages.progress import ExtractProgress, SearchProgress, duration


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def out(monkeypatch):
    """A fake terminal as progress's stdout (pytest's capture swaps sys.stdout back between
    fixture and test), progress in auto mode; restored afterwards."""
    stream = FakeTTY()
    monkeypatch.setattr(progress, "sys", SimpleNamespace(stdout=stream))
    progress.set_mode("auto")
    yield stream
    progress.set_mode("auto")


def screen(stream: io.StringIO, join: bool = True) -> list[str]:
    """What a terminal shows: each line's text after its last in-place redraw; a permanent line
    wrapped to the width (continuation lines indented) joined back into one (``join``)."""
    lines: list[str] = []
    for raw in stream.getvalue().split("\n"):
        text = raw.split("\r")[-1].replace("\x1b[2K", "")
        if join and text.startswith("    ") and lines:
            lines[-1] += " " + text.strip()
        else:
            lines.append(text)
    return [ln for ln in lines if ln]


def test_duration():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
    assert duration(float("inf")) == "?"


def test_extract_progress_counts_views_rate_eta_and_quarantine(out):
    bar = ExtractProgress(total=100)
    bar.update_from_summary({"kind": ["batch", "quarantine", "embeddings"], "rows": [16, 2, 14]})
    bar.update(16)
    text = bar.text()
    assert re.search(r"\b32/100 views\b", text) and "quarantined 2" in text
    assert re.search(r"([\d.]+|\?) img/s", text) and "ETA" in text
    bar.close()
    last = screen(out)[-1]
    assert last.startswith("extract done") and "32/100" in last


def test_extract_rate_and_eta_leave_model_loading_out(out, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    bar = ExtractProgress(total=100)  # t=0; the actors load their models until t=10
    now[0] = 10.0
    bar.update(16)  # the first batch; no rate yet
    assert "? img/s" in bar.text()
    now[0] = 12.0
    bar.update(16)  # 16 more views in 2 s
    assert bar.rate() == pytest.approx(8.0)
    assert "8.0 img/s" in bar.text() and "ETA 8s" in bar.text()  # 68 views left at 8/s


def test_extract_progress_off_a_terminal_prints_summaries_only(monkeypatch):
    stream = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress, "sys", SimpleNamespace(stdout=stream))
    progress.set_mode("auto")
    bar = ExtractProgress(total=10, summary_every_s=3600)
    for _ in range(5):
        bar.update(2)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first summary, then the final line; no redraws
    assert "\r" not in stream.getvalue() and "10/10" in lines[-1]


def test_quiet_prints_nothing(out):
    progress.set_mode("quiet")
    bar = ExtractProgress(total=4)
    bar.update(4)
    bar.close()
    assert out.getvalue() == ""


def test_set_mode_rejects_unknown():
    with pytest.raises(ValueError, match="loud"):
        progress.set_mode("loud")


def trial(trial_id: str, family: str, status: str = "RUNNING", **last):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last, path="",
                           config={"family": family, "features": "resnet50"})


def test_search_progress_done_stopped_failed_and_best(out):
    cb = SearchProgress(num_samples=5)
    cb.setup()
    a, b, c = trial("a", "logistic"), trial("b", "xgboost"), trial("c", "mlp")
    trials = [a, b, c]
    for t in trials:
        cb.on_trial_start(0, trials, t)
    cb.on_trial_result(0, trials, a, {"val_accuracy": 0.7, "val_balanced_accuracy": 0.5})
    cb.on_trial_result(0, trials, b, {"val_accuracy": 0.8, "training_iteration": 2})
    a.last_result = {"val_accuracy": 0.7, "final": True, "time_total_s": 3.0}
    cb.on_trial_complete(0, trials, a)
    b.last_result = {"val_accuracy": 0.8, "training_iteration": 2}  # ASHA stopped it
    cb.on_trial_complete(0, trials, b)
    cb.on_trial_error(0, trials, c)
    assert (cb.done, cb.stopped, cb.failed) == ({"a"}, {"b"}, {"c"})
    text = cb.status_text(trials)
    assert text.startswith("search 3/5 | ETA ")
    assert "1 done, 0 running, 1 stopped early, 1 error, 2 pending" in text, text
    assert "0.8000 (xgboost on resnet50)" in text
    cb.on_experiment_end(trials)
    shown = screen(out)
    trial_lines = [ln for ln in shown if ln.startswith("trial ")]
    assert len(trial_lines) == 3  # one per finished trial
    assert any("logistic" in ln and "0.7000" in ln and "done" in ln for ln in trial_lines)
    assert any("stopped early at iteration 2" in ln for ln in trial_lines)
    assert shown[-1].startswith("search finished: 3/5")


def test_search_off_a_terminal_writes_summaries_not_trial_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress, "sys", SimpleNamespace(stdout=stream))
    progress.set_mode("auto")
    cb = SearchProgress(num_samples=2, summary_every_s=3600)
    cb.setup()
    a, b = trial("a", "logistic"), trial("b", "logistic")
    for t in (a, b):
        cb.on_trial_start(0, [a, b], t)
        t.last_result = {"val_accuracy": 0.5, "final": True}
        cb.on_trial_complete(0, [a, b], t)
    cb.on_experiment_end([a, b])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("search finished: 2/2 trials: 2 done")
    progress.set_mode("verbose")  # --verbose: every line, also in a log
    cb.setup()
    before = len(lines)
    cb.on_trial_complete(0, [a], a)
    new = stream.getvalue().splitlines()[before:]
    assert any(ln.startswith("trial 1/2 logistic") for ln in new)
    progress.set_mode("auto")


def test_a_resumed_search_counts_the_trials_that_ended_before(out):
    cb = SearchProgress(num_samples=3)
    cb.setup()
    old = [trial("a", "logistic", "TERMINATED", val_accuracy=0.6, final=True),
           trial("b", "xgboost", "TERMINATED", val_accuracy=0.9),
           trial("c", "mlp", "ERROR")]
    text = cb.status_text(old)
    assert text.startswith("search 3/3 | ")
    assert "1 done, 0 running, 1 stopped early, 1 error, 0 pending" in text, text
    assert "0.9000 (xgboost on resnet50)" in text
    assert not [ln for ln in screen(out) if ln.startswith("trial ")]  # no lines for old trials


def test_search_progress_pickles_without_its_run_state():
    cb = SearchProgress(num_samples=3)
    cb.done.add("x")
    copy = pickle.loads(pickle.dumps(cb))  # Tune saves the callbacks with the experiment
    assert copy.num_samples == 3 and copy.done == set()


def test_tune_callbacks_add_mlflow_only_when_set():
    cfg = SimpleNamespace(num_samples=2, mlflow_tracking_uri="", experiment="heads", out="o")
    kinds = [type(c).__name__ for c in progress.tune_callbacks(cfg)]
    assert kinds == ["SearchProgress"]
    pytest.importorskip("mlflow")
    cfg.mlflow_tracking_uri = "file:///tmp/dermray-mlruns-unused"
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    callbacks = progress.tune_callbacks(cfg)
    assert type(callbacks[0]).__name__ == "SearchProgress" and len(callbacks) == 2
    assert isinstance(callbacks[1], MLflowLoggerCallback)  # dermray's own-metrics subclass


def test_status_is_cut_and_lines_wrapped_to_the_terminal_width(out, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # FakeTTY has no fd: the width comes from $COLUMNS
    cb = SearchProgress(num_samples=3)
    cb.setup()
    a = trial("a", "xgboost")
    cb.on_trial_start(0, [a], a)
    a.last_result = {"val_accuracy": 0.61, "val_balanced_accuracy": 0.4, "final": True,
                     "time_total_s": 65.0}
    cb.on_trial_complete(0, [a], a)
    cb.on_experiment_end([a])
    raw = screen(out, join=False)
    assert raw and all(len(ln) <= 39 for ln in raw), raw  # the last column stays free
    pieces = [piece.replace("\x1b[2K", "") for seg in out.getvalue().split("\r")
              for piece in seg.split("\n")]  # every redraw too, not only the last one
    assert any(p.startswith("search 1/3") for p in pieces)
    assert all(len(p) <= 39 for p in pieces), [p for p in pieces if len(p) > 39]
    joined = screen(out)  # wrapped, not cut: the trial line keeps every field
    line = next(ln for ln in joined if ln.startswith("trial 1/3"))
    assert "0.6100" in line and "0.4000" in line and "1m05s" in line and line.endswith("[a]")


def test_best_is_the_last_report_of_an_ended_trial_as_selection_ranks_it(out):
    """A trial that peaked at 0.95 and ended at 0.70 does not make 0.95 'best'; a tie on val
    accuracy goes to the better balanced accuracy; selection picks the same trial."""
    from dermray.stages.select import pick

    cb = SearchProgress(num_samples=3)
    cb.setup()
    a, b, c = trial("a", "mlp"), trial("b", "logistic"), trial("c", "xgboost")
    trials = [a, b, c]
    cb.on_trial_result(0, trials, a, {"val_accuracy": 0.95})  # a peak mid-training
    finals = {"a": {"val_accuracy": 0.70, "val_balanced_accuracy": 0.6, "val_log_loss": 0.9},
              "b": {"val_accuracy": 0.80, "val_balanced_accuracy": 0.5, "val_log_loss": 0.8},
              "c": {"val_accuracy": 0.80, "val_balanced_accuracy": 0.7, "val_log_loss": 1.1}}
    assert "best val_accuracy -" in cb.status_text(trials)  # nothing ended yet
    for t in trials:
        t.last_result = {**finals[t.trial_id], "final": True}
        cb.on_trial_complete(0, trials, t)
    assert cb.best == (0.8, "xgboost on resnet50", "c")
    frame = pd.DataFrame([{"trial_id": k, "family": t.config["family"], "features": "resnet50",
                           "params": "{}", "status": "done", **finals[k]}
                          for k, t in zip("abc", trials, strict=True)])
    assert pick(frame)["trial_id"] == cb.best[2]


def test_search_eta_from_ended_trials_and_the_time_budget(out, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    cb = SearchProgress(num_samples=6)
    cb.setup()
    trials = [trial(k, "logistic") for k in "ab"]
    assert "ETA ?" in cb.status_text(trials)  # no trial ended, no budget: unknown
    now[0] = 20.0
    for t in trials:
        t.last_result = {"val_accuracy": 0.5, "final": True}
        cb.on_trial_complete(0, trials, t)
    assert "ETA 40s" in cb.status_text(trials)  # 10 s per ended trial, 4 to go
    capped = SearchProgress(num_samples=6, time_budget_s=30.0)
    capped.setup()
    assert "ETA 30s" in capped.status_text([])  # the budget alone
    now[0] = 60.0  # 40 s after it started
    for t in trials:
        capped.on_trial_complete(0, trials, t)
    assert "ETA 0s" in capped.status_text(trials)  # 80 s at its pace, but the budget is spent
    assert pickle.loads(pickle.dumps(capped)).time_budget_s == 30.0


def test_predict_progress_on_a_terminal_only(monkeypatch):
    tty, pipe = FakeTTY(), io.StringIO()
    for stream, shown in ((tty, True), (pipe, False)):
        monkeypatch.setattr(progress, "sys", SimpleNamespace(stdout=io.StringIO(), stderr=stream))
        bar = progress.PredictProgress()
        bar(4, 10)
        bar(10, 10)
        bar.close()
        assert ("predict 10/10 images" in stream.getvalue()) is shown
    assert tty.getvalue().endswith("\r\x1b[2K")  # cleared when done: the CLI's line comes next


def test_predict_drain_reports_files_done_after_each_batch(tmp_path):
    """The local loop's (and the Ray job's) progress: files done, rows and skipped alike."""
    from dermray.models.predict_io import PredictionWriter, drain

    batches = [(pd.DataFrame({"path": ["a", "b"], "dx": ["nv", "mel"]}), []),
               (pd.DataFrame({"path": ["c"], "dx": ["nv"]}), ["d: not an image"])]
    seen: list[tuple[int, int]] = []
    writer = PredictionWriter(str(tmp_path / "p.csv"))
    with writer:
        skipped = drain(iter(batches), writer, 4, on_progress=lambda d, t: seen.append((d, t)))
    assert skipped == 1 and seen == [(2, 4), (4, 4)]
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3
