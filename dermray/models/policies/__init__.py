"""Operating points of one model: temperature scaling (``calibration``) and decision policies,
fitted on validation and stored in the bundle. A policy is one module that registers a
``PolicySpec`` (``registry``); importing this package registers the built-in ones, in this order:

- ``accuracy``: the argmax (the default);
- ``balanced``: a prior correction for balanced accuracy;
- ``melanoma``: a threshold on p(mel) for a target sensitivity.
"""

from __future__ import annotations

# isort: off
# importing a policy's module registers it; this order is the order policies are listed in
from dermray.models.policies import accuracy  # noqa: F401
from dermray.models.policies import balanced  # noqa: F401
from dermray.models.policies import melanoma  # noqa: F401
# isort: on
from dermray.models.policies.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from dermray.models.policies.registry import (
    MEL,
    POLICY_SPECS,
    PolicySpec,
    Validation,
    check_points,
    decide,
    decision_metrics,
    describe,
    fit_operating_points,
    get_policy,
    policy_names,
    policy_report,
    register_policy,
    unregister_policy,
)

# the built-in policies (the registry may hold more: policy_names() lists them all)
POLICIES: tuple[str, ...] = policy_names()

__all__ = ["MEL", "POLICIES", "POLICY_SPECS", "PolicySpec", "Validation", "calibrate",
           "check_points", "decide", "decision_metrics", "describe", "expected_calibration_error",
           "fit_operating_points", "fit_temperature", "get_policy", "nll", "policy_names",
           "policy_report", "register_policy", "unregister_policy"]
