"""The winner's operating points in the bundle: each policy reproduces its reported validation
and test numbers from the bundle alone, `--policy` changes decisions as documented, and the
bundle carries its model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermray.cli import main
from dermray.config import build_section
from dermray.models.bundle import load_bundle
from dermray.models.heads import get_family
from dermray.models.policies import MEL, POLICIES, decision_metrics
from dermray.models.predict_io import predict_files
from dermray.stages.search import head_inputs


@pytest.fixture(scope="module")
def winner(searched):
    out, _ = searched
    return out, load_bundle(out / "model"), json.loads((out / "metrics.json").read_text())


def test_each_policy_reproduces_its_reported_numbers_from_the_bundle(winner):
    out, bundle, reported = winner
    points = bundle.spec.operating_points
    assert points == reported["operating_points"] and points["temperature"] > 0
    cfg = build_section("search", {"out": str(out)})
    for split in ("val", "test"):
        X, y, _ = head_inputs(get_family(bundle.spec.family), cfg, bundle.spec.features,
                              split, str(out / "manifest.parquet"))
        proba = bundle.head.predict_proba(X)
        for policy in POLICIES:
            got = decision_metrics(y, bundle.decide(proba, policy))
            want = reported["policies"][split]["policies"][policy]
            assert got == want, (split, policy)  # JSON floats round-trip exactly
    # the melanoma threshold was chosen on validation for the target sensitivity
    val_mel = reported["policies"]["val"]["policies"]["melanoma"]["melanoma_sensitivity"]
    assert val_mel >= points["policies"]["melanoma"]["target_sensitivity"]
    assert reported["policies"]["val"]["nll_after"] <= reported["policies"]["val"]["nll_before"]


def test_policy_flag_changes_decisions_as_documented(winner, tmp_path):
    out, bundle, _ = winner
    manifest = pd.read_parquet(out / "manifest.parquet")
    quarantined = set(pd.read_parquet(out / "quarantine.parquet")["image_id"])
    rows = manifest[(manifest["split"] == "test") & ~manifest["image_id"].isin(quarantined)]
    paths = [str(p) for p in rows["path"][:24]]
    # the command once (the flag reaches the bundle), the same call in-process for the others
    csv = tmp_path / "melanoma.csv"
    assert main(["predict", "--model", str(out / "model"), "--policy", "melanoma",
                 "--out", str(csv), *paths]) == 0
    frames = {"melanoma": pd.read_csv(csv)}
    for policy in ("accuracy", "balanced"):
        frames[policy], _ = predict_files(bundle, paths, policy=policy)
    for policy, frame in frames.items():
        assert (frame["policy"] == policy).all() and len(frame) == len(paths)
    base, mel = frames["accuracy"], frames["melanoma"]
    # the same probabilities whatever the policy; only the decision moves
    np.testing.assert_allclose(base.filter(like="p_").to_numpy(float),
                               mel.filter(like="p_").to_numpy(float), atol=1e-5)
    proba = base.filter(like="p_").to_numpy(float)
    assert (base["dx"].to_numpy() == np.asarray(bundle.labels)[proba.argmax(axis=1)]).all()
    changed = base["dx"] != mel["dx"]
    assert (mel.loc[changed, "dx"] == "mel").all()  # the melanoma point only adds mel calls
    assert (mel["dx"] == "mel").sum() >= (base["dx"] == "mel").sum()
    np.testing.assert_array_equal(frames["balanced"]["dx"].to_numpy(), np.asarray(
        bundle.labels)[bundle.decide(proba, "balanced")])
    assert MEL == bundle.labels.index("mel")


def test_bundle_has_a_model_card(winner):
    out, _bundle, reported = winner
    card = (Path(out) / "model" / "model_card.md").read_text()
    assert "Not a diagnostic device" in card
    assert f"{reported['test']['accuracy']:.3f}" in card
    for policy in POLICIES:
        assert f"| {policy} |" in card
