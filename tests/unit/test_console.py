"""The terminal of issue 20 without Ray: other libraries' log records go to OUT/logs, dermray's
to the terminal and the file; a log line never glues onto the status line; the closing summary
names the report, the bundle and the next commands."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import sys
from types import SimpleNamespace

import pytest

from dermray.errors import DermrayError
from dermray.report.summary import run_summary
from dermray.stages import console, progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """Each terminal line's text after its last in-place redraw."""
    return [ln for ln in (raw.split("\r")[-1].replace("\x1b[2K", "") for raw in
                          text.split("\n")) if ln]


def _log_some() -> None:
    logging.getLogger("ray.tune.tune").info("Wrote the latest version of all result files")
    logging.getLogger("ray.data").info("Starting execution of Dataset")
    logging.getLogger("optuna.storages").info("A new study created in memory")
    logging.getLogger("dermray.stages.select").info("scored the winner")


def test_library_logs_go_to_the_file_and_dermrays_to_both(tmp_path, monkeypatch):
    term = FakeTTY()
    monkeypatch.setattr(sys, "stderr", term)
    root_handlers = list(logging.getLogger().handlers)
    with console.session(verbose=False):
        path = console.log_to(str(tmp_path / "out"))
        _log_some()
        assert console.current_log_file() == str(path)
    assert path == tmp_path / "out" / "logs" / "dermray.log"
    shown, kept = term.getvalue(), path.read_text()
    assert "scored the winner" in shown
    for text in ("Wrote the latest", "Starting execution", "A new study"):
        assert text not in shown and text in kept
    assert "scored the winner" in kept
    assert logging.getLogger().handlers == root_handlers  # the session leaves logging as it was
    assert console.current_log_file() == ""


def test_verbose_shows_every_library_line_on_a_line_of_its_own(tmp_path, monkeypatch):
    term = FakeTTY()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress, "sys", SimpleNamespace(stdout=term, stderr=term))
    with console.session(verbose=True):
        printer = progress.Printer()
        printer.status("search 1/2 trials: 0 done, 1 running")  # no newline: redrawn in place
        _log_some()
    lines = screen(term.getvalue())
    assert any(ln.startswith("[ray.tune.tune] info: Wrote the latest") for ln in lines), lines
    assert any(ln.startswith("[optuna.storages] info: A new study") for ln in lines)
    assert not [ln for ln in lines if "running" in ln and "info:" in ln]  # nothing glued


def test_an_unwritable_out_for_the_log_file_is_a_message(tmp_path):
    (tmp_path / "afile").write_text("x")
    with console.session(), pytest.raises(DermrayError, match=str(tmp_path / "afile" / "out")):
        console.log_to(str(tmp_path / "afile" / "out"))


RESULT = {
    "out": "/runs/a", "winner": {"family": "xgboost", "features": "resnet50+vgg19",
                                 "trial_id": "t_00003", "val_accuracy": 0.8189,
                                 "test_accuracy": 0.8012, "test_balanced_accuracy": 0.6543},
    "policies": {"val": {"policies": {"accuracy": {"accuracy": 0.8189, "balanced_accuracy": 0.61},
                                      "melanoma": {"accuracy": 0.70, "balanced_accuracy": 0.66}}},
                 "test": {"policies": {
                     "accuracy": {"accuracy": 0.8012, "balanced_accuracy": 0.6543,
                                  "melanoma_sensitivity": 0.41},
                     "melanoma": {"accuracy": 0.69, "balanced_accuracy": 0.64,
                                  "melanoma_sensitivity": 0.83}}}},
    "report_html": "/runs/a/report.html", "model": "/runs/a/model",
    "trials": "/runs/a/trials.csv", "tune_logs": "/runs/a/tune",
    "logs": "/runs/a/logs/dermray.log",
    "ensemble": "out-of-fold validation accuracy 0.8100 does not beat the best trial's 0.8189",
}


def test_the_closing_summary_names_the_winner_policies_paths_and_next_commands():
    lines = run_summary(RESULT)
    text = "\n".join(lines)
    assert lines[0].startswith("winner: xgboost on resnet50+vgg19 (trial t_00003)")
    assert "0.8189" in lines[1] and "0.8012" in lines[1]
    assert " ".join(ln.strip() for ln in lines[2:4]) == (
        "ensemble candidate: out-of-fold validation accuracy 0.8100 does not beat the best "
        "trial's 0.8189")
    melanoma = next(ln.split() for ln in lines if ln.strip().startswith("melanoma"))
    assert melanoma[1:] == ["0.7000", "0.6600", "0.6900", "0.6400", "0.8300"]
    for path in ("/runs/a/report.html", "/runs/a/model", "/runs/a/logs/dermray.log"):
        assert path in text
    assert "dermray predict --model /runs/a/model" in text
    assert "dermray report /runs/a" in text and "tensorboard --logdir /runs/a/tune" in text
    assert all(len(ln) <= 79 for ln in lines)


def test_what_cpp_code_writes_to_a_terminal_stderr_goes_to_the_log_file(tmp_path):
    """Ray's core worker writes its ERROR lines to fd 2 itself, past Python's logging: with fd 2
    on a terminal, they land in OUT/logs; dermray's own lines still reach the terminal."""
    master, slave = pty.openpty()
    sys.stderr.flush()
    saved, saved_stream = os.dup(2), sys.stderr
    os.dup2(slave, 2)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)  # Python's stderr on fd 2's terminal
    try:
        with console.session(verbose=False):
            path = console.log_to(str(tmp_path / "out"))
            os.write(2, b"[2026-12-03 04:57:21,864 E 1 2] core_worker.cc:123: constructor\n")
            logging.getLogger("dermray.x").warning("one of ours")
            print("error: also ours", file=sys.stderr)
        os.write(2, b"after the session\n")  # fd 2 is the terminal again
    finally:
        sys.stderr.close()
        sys.stderr = saved_stream
        os.dup2(saved, 2)
        os.close(saved)
        os.close(slave)
    shown = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the slave side is closed and everything was read
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    shown_text = shown.decode()
    assert "warning: one of ours" in shown_text and "error: also ours" in shown_text
    assert "after the session" in shown_text
    assert "core_worker.cc" not in shown_text
    assert "core_worker.cc:123: constructor" in path.read_text()
