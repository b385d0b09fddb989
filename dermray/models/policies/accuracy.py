"""The ``accuracy`` policy (the default): the class of highest calibrated probability. Temperature
scaling never changes the argmax, so this is the head's own decision."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dermray.models.policies.registry import PolicySpec, register_policy


def decide(proba: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return proba.argmax(axis=1)


def describe(params: Mapping[str, Any]) -> str:
    return "argmax"


SPEC = register_policy(PolicySpec(name="accuracy", summary="the argmax, the default",
                                  decide=decide, describe=describe))
