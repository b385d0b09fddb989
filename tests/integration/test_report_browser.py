"""The Tune results dashboard opened in headless Chromium: a screenshot, one row per trial."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from dermray.report.dashboard import write_dashboard


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class TrialRows(HTMLParser):
    """Counts the <tr> in the tbody of table#trials."""

    def __init__(self) -> None:
        super().__init__()
        self.table = self.body = False
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.table = dict(attrs).get("id") == "trials"
        elif tag == "tbody" and self.table:
            self.body = True
        elif tag == "tr" and self.body:
            self.rows += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.body = False


def test_report_opens_offline_in_chromium(searched, tmp_path):
    out, _ = searched
    page = Path(write_dashboard(str(out)))
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: opens offline
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (CI installs Debian's chromium; apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert shot.stat().st_size > 20_000
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    parser = TrialRows()
    parser.feed(dom)
    assert parser.rows == len(pd.read_csv(out / "trials.csv")) > 0
