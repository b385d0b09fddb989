"""`dermray report OUT` while a search runs: the page is built from the Tune experiment's files
as they are, lists the trials so far with their status, and says PARTIAL; headless Chromium
renders it (the screenshot is kept next to the page for a person to look at)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report_browser import TrialRows, find_browser

from dermray.cli import main
from dermray.report.dashboard import live_trials


@pytest.fixture
def running(searched, tmp_path):
    """A copy of the session's experiment caught mid-search: no trials.csv / metrics.json yet,
    one trial with only its first result (Tune still says RUNNING), and a half-written line."""
    out, _ = searched
    live = tmp_path / "out"
    shutil.copytree(out / "tune", live / "tune")
    trial_dirs = sorted(p.parent for p in (live / "tune").glob("*/*/result.json"))
    # a trial that reported more than once (an iterative family): cut back to its first report,
    # it is mid-training (a one-report trial's only line is already its final one)
    first = next(d for d in trial_dirs
                 if len((d / "result.json").read_text().splitlines()) > 1)
    lines = (first / "result.json").read_text().splitlines()
    trial_id = json.loads(lines[0])["trial_id"]
    (first / "result.json").write_text(lines[0] + "\n" + lines[-1][:40])
    for state in first.parent.glob("experiment_state-*.json"):
        data = json.loads(state.read_text())
        for entry in data["trial_data"]:
            trial = json.loads(entry[0])
            if trial["trial_id"] == trial_id:
                trial["status"] = "RUNNING"
                entry[0] = json.dumps(trial)
        state.write_text(json.dumps(data))
    return live, trial_id, len(trial_dirs)


def test_partial_report_while_the_search_runs(running, tmp_path, capsys):
    live, trial_id, n_trials = running
    frame = live_trials(str(live))
    assert len(frame) == n_trials
    assert frame.set_index("trial_id").loc[trial_id, "status"] == "running"
    assert frame["val_accuracy"].notna().all()  # every trial has reported at least once
    assert main(["report", str(live)]) == 0
    page = live / "report.html"
    text = page.read_text()
    assert "PARTIAL" in text and 'id="partial"' in text
    assert "http://" not in text and "https://" not in text
    rows = TrialRows()
    rows.feed(text)
    assert rows.rows == n_trials
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800"]
    shot = live / "report_partial.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert shot.stat().st_size > 20_000


def test_no_trials_yet_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no Tune trials under OUT/tune yet" in capsys.readouterr().err
    assert not Path(tmp_path, "report.html").exists()
