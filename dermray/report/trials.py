"""One vocabulary of trial states, shared by the console, trials.csv and the report.

Tune's own statuses (PENDING, RUNNING, TERMINATED, ERROR) do not say whether a TERMINATED trial
ran to its final report or was stopped by ASHA or the time budget; these words do.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

DONE = "done"  # ran to its final report
STOPPED = "stopped early"  # ended before its final report (ASHA, the time budget)
ERROR = "error"
RUNNING = "running"
PENDING = "pending"
STATES = (DONE, STOPPED, ERROR, RUNNING, PENDING)
ENDED = (DONE, STOPPED)  # the states a winner may be picked from


def trial_state(tune_status: str, final: bool) -> str:
    """A trial's state from Tune's status and whether its final result came in."""
    status = (tune_status or "").upper()
    if status == "ERROR":
        return ERROR
    if final:
        return DONE
    if status == "TERMINATED":
        return STOPPED
    return PENDING if status == "PENDING" else RUNNING


def iso_time(timestamp: Any) -> str:
    """Epoch seconds (Tune's ``timestamp``) as an ISO 8601 UTC time; '' when unknown."""
    try:
        value = float(timestamp)
    except (TypeError, ValueError):
        return ""
    if math.isnan(value):
        return ""
    return pd.Timestamp(value, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
