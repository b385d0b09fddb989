"""docs/results.md recomputed from the cached real embeddings (slow: not in `make test`).

    .venv/bin/python -m pytest -m slow tests/integration/test_results_slow.py

Needs OUT of `dermray run --config ray_jobs/configs/ham10000_local.yaml --out out/ham10000`
(set DERMRAY_RESULTS_OUT for another folder); skips with a reason where it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("DERMRAY_RESULTS_OUT", REPO / "out" / "ham10000"))
pytestmark = pytest.mark.slow
POLICIES = ("accuracy", "balanced", "melanoma")


def documented_rows() -> dict[str, tuple[float, float, float]]:
    """model name -> (val acc, test acc, test balanced acc) from the tables of docs/results.md."""
    rows = {}
    for line in (REPO / "docs" / "results.md").read_text().splitlines():
        if line.startswith("## Earlier results"):  # older runs' tables: history, not checked
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[1:2] and cells[1] in POLICIES:  # an operating point's row, not a model's
            continue
        if len(cells) >= 6 and re.fullmatch(r"0\.\d{4}", cells[2] or ""):
            rows[cells[0]] = (float(cells[2]), float(cells[3]), float(cells[4]))
    return rows


def documented_policies() -> dict[tuple[str, str], tuple[float, ...]]:
    """(model name, policy) -> (test acc, test bal. acc, mel sensitivity, mel specificity)."""
    rows = {}
    for line in (REPO / "docs" / "results.md").read_text().splitlines():
        if line.startswith("## Earlier results"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1] in POLICIES and re.fullmatch(r"0\.\d{4}", cells[2]):
            rows[cells[0], cells[1]] = tuple(float(c) for c in cells[2:])
    return rows


def test_results_table_matches_docs():
    if not (OUT / "extract_run.json").is_file():
        pytest.skip(f"{OUT} has no extraction; run the ham10000_local config first")
    spec = importlib.util.spec_from_file_location("results_table",
                                                  REPO / "benchmarks" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.compute(str(OUT))
    documented = documented_rows()
    assert documented, "docs/results.md has no results table"
    for pair in table["pairs"]:  # the search's trials: validation only
        val, bal, _ = documented[pair["name"]]
        assert pair["val_accuracy"] == pytest.approx(val, abs=2e-3), pair["name"]
        assert pair["val_balanced_accuracy"] == pytest.approx(bal, abs=2e-3), pair["name"]
    for row in table["families"] + table["ablation"]:
        val, test, bal = documented[row["name"]]
        assert row["val"]["accuracy"] == pytest.approx(val, abs=2e-3), row["name"]
        assert row["test"]["accuracy"] == pytest.approx(test, abs=2e-3), row["name"]
        assert row["test"]["balanced_accuracy"] == pytest.approx(bal, abs=2e-3), row["name"]
    policies = documented_policies()
    winner = table["winner"]
    assert winner["policies"]["test"], "metrics.json has no operating points of the winner"
    for name, m in winner["policies"]["test"].items():  # the exported winner's, on test
        documented = policies[winner["name"], name]
        assert (m["accuracy"], m["balanced_accuracy"]) == pytest.approx(documented[:2], abs=2e-3)
        assert (m["melanoma_sensitivity"], m["melanoma_specificity"]) == pytest.approx(
            documented[2:], abs=2e-3), (winner["name"], name)
