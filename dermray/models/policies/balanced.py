"""The ``balanced`` policy: a prior correction, ``p / prior ** alpha``, whose strength ``alpha``
maximises validation balanced accuracy (the prior: the training split's class shares; ties: the
weakest correction)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.models.policies.calibration import EPS
from dermray.models.policies.registry import (
    PolicySpec,
    Validation,
    balanced_accuracy,
    register_policy,
)

ALPHAS = np.round(np.arange(0.0, 2.01, 0.05), 2)


def prior_corrected(proba: np.ndarray, prior: np.ndarray, alpha: float) -> np.ndarray:
    return proba / np.clip(prior, EPS, None) ** alpha


def fit(validation: Validation) -> dict[str, Any]:
    scores = [balanced_accuracy(validation.y, prior_corrected(validation.proba, validation.prior,
                                                              a).argmax(axis=1))
              for a in ALPHAS]
    alpha = float(ALPHAS[int(np.argmax(scores))])  # ties: the weakest correction
    return {"alpha": alpha, "prior": validation.prior.round(6).tolist()}


def decide(proba: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return prior_corrected(proba, np.asarray(params["prior"]), params["alpha"]).argmax(axis=1)


def describe(params: Mapping[str, Any]) -> str:
    return f"argmax of p / prior^{params['alpha']:g}"


def check(params: Mapping[str, Any]) -> None:
    alpha, prior = params.get("alpha"), np.asarray(params.get("prior", []), dtype=float)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise DermrayError(f"The balanced policy's alpha must be a finite number >= 0. Got "
                           f"{alpha!r} instead.")
    if prior.shape != (len(CLASSES),) or not np.isfinite(prior).all() or (prior < 0).any() or (
            abs(prior.sum() - 1.0) > 1e-4):
        raise DermrayError(f"The balanced policy's prior must be {len(CLASSES)} shares >= 0 "
                           f"that sum to 1. Got {params.get('prior')!r} instead.")


SPEC = register_policy(PolicySpec(
    name="balanced", summary="prior-corrected for balanced accuracy", decide=decide, fit=fit,
    describe=describe, check=check))
