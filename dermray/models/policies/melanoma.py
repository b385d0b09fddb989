"""The ``melanoma`` policy: "mel" wherever p(mel) reaches a threshold, chosen as the highest
threshold whose validation melanoma sensitivity reaches a target (``search.melanoma_target``,
0.90 by default); elsewhere the argmax."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dermray.errors import DermrayError
from dermray.models.policies.registry import MEL, PolicySpec, Validation, register_policy

DEFAULT_TARGET = 0.90


def melanoma_threshold(p_mel: np.ndarray, is_mel: np.ndarray, target: float) -> float:
    """The highest threshold on p(mel) whose sensitivity on these rows reaches ``target``."""
    if not is_mel.any():
        raise DermrayError("The validation split has no melanoma: the melanoma policy cannot be "
                           "fitted (re-split with more data).")
    scores = np.sort(p_mel[is_mel])[::-1]
    k = int(np.ceil(target * len(scores)))  # this many melanomas must be at or above it
    return float(scores[min(k, len(scores)) - 1])


def fit(validation: Validation) -> dict[str, Any]:
    target = validation.settings.get("melanoma_target", DEFAULT_TARGET)
    if not 0.0 < target <= 1.0:
        raise DermrayError(f"The melanoma target sensitivity must be in (0, 1]. Got {target!r} "
                           "instead.")
    return {"threshold": melanoma_threshold(validation.proba[:, MEL], validation.y == MEL,
                                            target),
            "target_sensitivity": target}


def decide(proba: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return np.where(proba[:, MEL] >= params["threshold"], MEL, proba.argmax(axis=1))


def describe(params: Mapping[str, Any]) -> str:
    return (f"mel where p(mel) >= {params['threshold']:.3f} (validation sensitivity >= "
            f"{params['target_sensitivity']:g}), else argmax")


def check(params: Mapping[str, Any]) -> None:
    threshold = params.get("threshold")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not (
            0.0 <= threshold <= 1.0):
        raise DermrayError(f"The melanoma policy's threshold must be in [0, 1]. Got "
                           f"{threshold!r} instead.")


SPEC = register_policy(PolicySpec(
    name="melanoma", summary="p(mel) threshold for the target sensitivity, "
    "search.melanoma_target", decide=decide, fit=fit, describe=describe, check=check))
