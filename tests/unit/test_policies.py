"""Operating points on synthetic scores: temperature scaling, the balanced and melanoma policies."""

from __future__ import annotations

import numpy as np
import pytest

from dermray.errors import DermrayError
from dermray.models.policies import (
    MEL,
    calibrate,
    check_points,
    decide,
    decision_metrics,
    fit_operating_points,
    fit_temperature,
    nll,
    policy_report,
)

SHARES = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])


def overconfident_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An imbalanced 7-class problem whose probabilities are too sharp and favour big classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=SHARES)
    logits = rng.normal(0, 1.0, (n, 7)) + 1.2 * np.eye(7)[y] + np.log(SHARES)
    proba = np.exp(4.0 * logits)  # far too confident
    return proba / proba.sum(axis=1, keepdims=True), y


def test_temperature_scaling_lowers_validation_nll():
    proba, y = overconfident_scores(3000, 0)
    t = fit_temperature(proba, y)
    assert t > 1.5  # it softens over-confident scores
    assert nll(calibrate(proba, t), y) < 0.8 * nll(proba, y)
    np.testing.assert_allclose(calibrate(proba, 1.0), proba, atol=1e-9)


def test_policies_reach_what_they_promise_on_validation_and_hold_on_test():
    val, y_val = overconfident_scores(4000, 1)
    test, y_test = overconfident_scores(4000, 2)
    points = fit_operating_points(val, y_val, SHARES, {"melanoma_target": 0.9})
    report = policy_report(val, y_val, points)
    acc, bal, mel = (report["policies"][p] for p in ("accuracy", "balanced", "melanoma"))
    assert bal["balanced_accuracy"] > acc["balanced_accuracy"] + 0.05
    assert mel["melanoma_sensitivity"] >= 0.9 > acc["melanoma_sensitivity"]
    assert report["ece_after"] < report["ece_before"]
    on_test = policy_report(test, y_test, points)["policies"]
    assert on_test["melanoma"]["melanoma_sensitivity"] > 0.85
    assert on_test["balanced"]["balanced_accuracy"] > on_test["accuracy"]["balanced_accuracy"]


def test_policies_change_decisions_as_documented():
    val, y_val = overconfident_scores(2000, 3)
    points = fit_operating_points(val, y_val, SHARES)
    base = decide(val, points, "accuracy")
    np.testing.assert_array_equal(base, calibrate(val, points["temperature"]).argmax(axis=1))
    mel = decide(val, points, "melanoma")
    changed = mel != base
    assert changed.any() and (mel[changed] == MEL).all()  # it only ever adds melanoma calls
    p_mel = calibrate(val, points["temperature"])[:, MEL]
    assert (p_mel[changed] >= points["policies"]["melanoma"]["threshold"]).all()
    assert (decide(val, points, "balanced") != base).any()
    with pytest.raises(DermrayError, match="Known policies: accuracy, balanced, melanoma"):
        decide(val, points, "sensitive")


def test_metrics_name_melanoma_sensitivity_and_specificity():
    y = np.array([MEL, MEL, 5, 5])
    m = decision_metrics(y, np.array([MEL, 5, MEL, 5]))
    assert m["melanoma_sensitivity"] == 0.5 and m["melanoma_specificity"] == 0.5
    assert m["recall"]["akiec"] is None and m["recall"]["mel"] == 0.5


@pytest.mark.parametrize("damage", [
    ("temperature", None, float("nan")), ("temperature", None, 0.0),
    ("melanoma", "threshold", 5.0), ("melanoma", "threshold", float("nan")),
    ("balanced", "alpha", float("inf")), ("balanced", "prior", [1.0]),
    ("balanced", "prior", [0.5] * 7)])
def test_operating_points_are_checked_to_the_last_number(damage):
    val, y_val = overconfident_scores(1000, 4)
    points = fit_operating_points(val, y_val, SHARES)
    check_points(points)  # as fitted: usable
    where, key, value = damage
    if key is None:
        points[where] = value
    else:
        points["policies"][where][key] = value
    with pytest.raises(DermrayError):
        check_points(points)
