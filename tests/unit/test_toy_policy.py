"""A decision policy registered in this test alone ("unsure": the training split's commonest
class wherever the model is unsure) is fitted at selection time, applied by decide (what a
bundle's decide calls), tabled in the report with its rule and offered by the CLI: the registry
is the only place a policy has to be known."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from dermray.cli import build_parser
from dermray.config import SearchConfig
from dermray.models.policies import (
    POLICIES,
    PolicySpec,
    Validation,
    calibrate,
    decide,
    decision_metrics,
    register_policy,
    unregister_policy,
)
from dermray.report.evaluate import policy_lines
from dermray.stages.select import operating_points


def fit(validation: Validation) -> dict[str, Any]:
    return {"cutoff": float(np.median(validation.proba.max(axis=1))),
            "fallback": int(np.argmax(validation.prior))}


def unsure_decide(proba: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return np.where(proba.max(axis=1) >= params["cutoff"], proba.argmax(axis=1),
                    params["fallback"])


def describe(params: Mapping[str, Any]) -> str:
    return f"class {params['fallback']} where max p < {params['cutoff']:.3f}"


@pytest.fixture
def unsure():
    yield register_policy(PolicySpec(name="unsure", summary="the commonest class when unsure",
                                     decide=unsure_decide, fit=fit, describe=describe))
    unregister_policy("unsure")


def scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(7), rng.integers(0, 7, n - 7)])  # every class, melanoma too
    logits = rng.normal(0, 1.0, (n, 7)) + 1.5 * np.eye(7)[y]
    proba = np.exp(3.0 * logits)
    return proba / proba.sum(axis=1, keepdims=True), y


def test_a_policy_registered_here_is_fitted_decided_reported_and_offered(unsure, synth_manifest):
    (val, y_val), (test, y_test) = scores(400, 0), scores(400, 1)
    points, reports = operating_points({"val": (val, y_val), "test": (test, y_test)},
                                       SearchConfig(), str(synth_manifest))
    assert list(points["policies"]) == [*POLICIES, "unsure"]
    # fitted on validation's calibrated probabilities and the training split's prior
    params = points["policies"]["unsure"]
    cal_val = calibrate(val, points["temperature"])
    assert params["cutoff"] == float(np.median(cal_val.max(axis=1)))
    assert 0 <= params["fallback"] < 7
    # decide applies it: the argmax where sure, the fallback elsewhere
    cal_test = calibrate(test, points["temperature"])
    pred = decide(test, points, "unsure")
    sure = cal_test.max(axis=1) >= params["cutoff"]
    assert 0 < sure.sum() < len(sure)
    np.testing.assert_array_equal(pred[sure], cal_test.argmax(axis=1)[sure])
    assert (pred[~sure] == params["fallback"]).all()
    assert reports["test"]["policies"]["unsure"] == decision_metrics(y_test, pred)
    # the report tables it with its fitted rule; the CLI offers it
    assert any(line.startswith(f"| unsure | {describe(params)} | ")
               for line in policy_lines(reports, points))
    args = build_parser().parse_args(["predict", "--model", "m", "--policy", "unsure", "a.jpg"])
    assert args.policy == "unsure"


def test_an_unregistered_policy_is_neither_fitted_nor_offered():
    assert "unsure" not in POLICIES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--model", "m", "--policy", "unsure", "a.jpg"])
