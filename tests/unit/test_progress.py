"""Progress lines without Ray: the extraction counters and the Tune callback, on a fake terminal
and on a plain stream; counts and fields, not the exact text."""

from __future__ import annotations

import io
import pickle
import re
from types import SimpleNamespace

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
    assert re.search(r"3/5 trials: 1 done, 0 running, 1 stopped early, 1 error, 2 pending",
                     text), text
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
    assert re.search(r"3/3 trials: 1 done, 0 running, 1 stopped early, 1 error, 0 pending", text)
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
