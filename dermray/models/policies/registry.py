"""The decision-policy registry, like the head families': each policy registers a ``PolicySpec``
in its own module, and selection (fitting), the bundle (deciding), the CLI (``--policy``) and the
reports ask the registry instead of naming policies.

A model's operating points are the temperature plus each registered policy's parameters, all
fitted on validation at selection time and stored in the bundle::

    {"temperature": T, "policies": {"accuracy": {}, "balanced": {"alpha": ..., "prior": [...]},
                                    "melanoma": {"threshold": ..., "target_sensitivity": ...}}}

``decide`` applies one of them to a model's probabilities; the test split is never used to choose
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermray.domain import CLASSES
from dermray.errors import DermrayError, lookup
from dermray.models.policies.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
)

MEL = CLASSES.index("mel")


@dataclass(frozen=True)
class Validation:
    """What a policy is fitted on, at selection time: the validation split only.

    Attributes:
        proba: the winner's temperature-scaled probabilities on validation (N x classes).
        y: the true class indices.
        prior: the training split's class shares (they sum to 1).
        settings: the search config's values (``search.melanoma_target``, ...).
    """

    proba: np.ndarray
    y: np.ndarray
    prior: np.ndarray
    settings: Mapping[str, Any]


def no_params(validation: Validation) -> dict[str, Any]:
    return {}


def no_rule(params: Mapping[str, Any]) -> str:
    return ""


def no_check(params: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class PolicySpec:
    """What a decision policy is, for every stage that uses one.

    Attributes:
        name: the policy's name (``--policy NAME``, the key in the bundle's operating points).
        summary: what it targets, in a few words (the CLI's help).
        decide: ``decide(proba, params)``: class indices from temperature-scaled probabilities
            and the policy's fitted parameters.
        fit: ``fit(validation)``: the policy's parameters (JSON numbers and lists), chosen on
            the validation split (``Validation``).
        describe: ``describe(params)``: the fitted rule in words, for the reports.
        check: ``check(params)``: raise DermrayError unless loaded parameters are usable (a
            bundle is checked on load to the last number).
    """

    name: str
    summary: str
    decide: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
    fit: Callable[[Validation], dict[str, Any]] = no_params
    describe: Callable[[Mapping[str, Any]], str] = no_rule
    check: Callable[[Mapping[str, Any]], None] = no_check


POLICY_SPECS: dict[str, PolicySpec] = {}


def register_policy(spec: PolicySpec) -> PolicySpec:
    """Add (or replace) a policy; returns the spec, so a module can keep it."""
    POLICY_SPECS[spec.name] = spec
    return spec


def unregister_policy(name: str) -> None:
    POLICY_SPECS.pop(name, None)


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order (``accuracy`` first: the default)."""
    return tuple(POLICY_SPECS)


def get_policy(name: str) -> PolicySpec:
    return lookup(POLICY_SPECS, name, "policy", "policies", DermrayError)


def fit_operating_points(val_proba: np.ndarray, y_val: np.ndarray, train_prior: np.ndarray,
                         settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The temperature and every registered policy's parameters, all chosen on validation."""
    temperature = fit_temperature(val_proba, y_val)
    prior = np.asarray(train_prior, dtype=float) / np.sum(train_prior)
    validation = Validation(calibrate(val_proba, temperature), np.asarray(y_val), prior,
                            dict(settings or {}))
    return {"temperature": temperature,
            "policies": {name: spec.fit(validation) for name, spec in POLICY_SPECS.items()}}


def decide(proba: np.ndarray, points: Mapping[str, Any], policy: str = "accuracy",
           calibrated: bool = False) -> np.ndarray:
    """Class indices under a policy (``proba`` raw, or already calibrated)."""
    spec = get_policy(policy)
    params = points["policies"].get(policy)
    if params is None:
        raise DermrayError(f"These operating points have no {policy!r} policy (fitted: "
                           f"{', '.join(points['policies'])}): export the model again to fit it.")
    cal = proba if calibrated else calibrate(proba, points["temperature"])
    return spec.decide(cal, params)


def describe(points: Mapping[str, Any] | None, policy: str) -> str:
    """A fitted policy's rule in words ("" where unknown)."""
    if not points or policy not in points.get("policies", {}) or policy not in POLICY_SPECS:
        return ""
    return POLICY_SPECS[policy].describe(points["policies"][policy])


def check_points(points: Mapping[str, Any]) -> None:
    """Raise DermrayError unless the temperature and each policy's parameters are usable."""
    temperature = points.get("temperature")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or (
            temperature <= 0):
        raise DermrayError(f"The operating points' temperature must be a finite number > 0. "
                           f"Got {temperature!r} instead.")
    for name, params in points.get("policies", {}).items():
        get_policy(name).check(params)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [(pred[y == c] == c).mean() for c in np.unique(y)]
    return float(np.mean(recalls))


def decision_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall, melanoma sensitivity and specificity."""
    is_mel, said_mel = y == MEL, pred == MEL
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "recall": {c: (float((pred[y == i] == i).mean()) if (y == i).any() else None)
                   for i, c in enumerate(CLASSES)},
        "melanoma_sensitivity": float(said_mel[is_mel].mean()) if is_mel.any() else None,
        "melanoma_specificity": float((~said_mel[~is_mel]).mean()) if (~is_mel).any() else None,
    }


def policy_report(proba: np.ndarray, y: np.ndarray, points: Mapping[str, Any]) -> dict[str, Any]:
    """Every fitted policy's decision metrics on one split, with calibration before and after."""
    cal = calibrate(proba, points["temperature"])
    return {
        "ece_before": expected_calibration_error(proba, y),
        "ece_after": expected_calibration_error(cal, y),
        "nll_before": nll(proba, y), "nll_after": nll(cal, y),
        "policies": {name: decision_metrics(y, decide(cal, points, name, calibrated=True))
                     for name in points["policies"]},
    }
