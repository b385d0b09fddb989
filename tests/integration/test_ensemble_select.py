"""The select stage's ensemble candidate on the session's real (tiny) search: built from the best
trial of each (family, backbones), recorded in metrics.json, report.md and report.html, and,
when it wins, exported as one bundle whose members give the validation figures selection
reported. The bar is lowered here (the best trial's accuracy taken as -1) so that the export path
runs whatever the tiny data says; the comparison itself is tests/unit/test_ensemble.py's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermray.config import build_section
from dermray.models.bundle import load_bundle
from dermray.models.ensemble import mix
from dermray.models.heads import get_family
from dermray.report.evaluate import metrics
from dermray.stages import select
from dermray.stages.search import head_inputs


def session_search() -> dict:
    """The search settings of the session's ``searched`` fixture (this folder's conftest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_integration_conftest",
                                                  Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SEARCH


@pytest.mark.slow
def test_the_search_s_ensemble_is_recorded_and_exported(searched, tmp_path, monkeypatch):
    from ray.tune import ExperimentAnalysis, ResultGrid

    out, _ = searched
    results = ResultGrid(ExperimentAnalysis(str(out / "tune" / "heads")))
    cfg = build_section("search", {**session_search(), "out": str(out), "ensemble": True})
    real = select.ensemble_candidate
    monkeypatch.setattr(select, "ensemble_candidate",
                        lambda members, best, lesions, seed=0: real(members, -1.0, lesions, seed))
    target = tmp_path / "selected"
    manifest = str(out / "manifest.parquet")
    summary = select.finish(results, cfg, manifest, str(target))

    record = json.loads((target / "metrics.json").read_text())["ensemble"]
    assert record["chosen"] and record == json.loads(json.dumps(summary["ensemble"]))
    families = {m["family"] for m in record["members"]}
    assert "finetune" not in families and len(record["members"]) >= 2
    assert "Ensemble candidate" in (target / "report.md").read_text()
    assert "Ensemble candidate" in (target / "report.html").read_text()

    bundle = load_bundle(target / "model")
    assert bundle.spec.family == "ensemble"
    assert [m.trial_id for m in bundle.spec.members] == [m["trial_id"] for m in
                                                         record["members"]]
    # the members' heads from the bundle, on the search's val inputs, mixed with its weights:
    # the validation figures selection reported
    probas, y = [], None
    for member, head in zip(bundle.spec.members, bundle.head.heads, strict=True):
        X, y_m, rows = head_inputs(get_family(member.family), cfg, member.features, "val",
                                   manifest)
        order = np.argsort(rows["image_id"].astype(str).to_numpy(), kind="stable")
        probas.append(head.predict_proba(X)[order])
        y = y_m[order] if y is None else y
        assert (y_m[order] == y).all()
    got = metrics(y, mix(probas, [m.weight for m in bundle.spec.members]))
    assert got["accuracy"] == pytest.approx(record["val"]["accuracy"], abs=1e-12)
    assert got["log_loss"] == pytest.approx(record["val"]["log_loss"], rel=1e-6)
