"""Operating points of one model: temperature scaling and decision policies, fitted on validation.

Pure numpy. A model's probabilities are first calibrated (``p ** (1/T)``, renormalised: the
softmax of ``log p / T``), then a policy turns them into decisions:

- ``accuracy``: the argmax (the default);
- ``balanced``: a prior correction, ``p / prior ** alpha``, whose strength ``alpha`` maximises
  validation balanced accuracy (the prior: the training split's class shares);
- ``melanoma``: "mel" wherever p(mel) reaches a threshold, chosen as the highest threshold whose
  validation melanoma sensitivity reaches a target (0.90 by default), else the argmax.

Everything a policy needs is a few numbers, stored in the bundle (``fit_operating_points``) and
applied with ``decide``; the test split is never used to choose them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dermray.domain import CLASSES
from dermray.errors import DermrayError

POLICIES: tuple[str, ...] = ("accuracy", "balanced", "melanoma")
MEL = CLASSES.index("mel")
ALPHAS = np.round(np.arange(0.0, 2.01, 0.05), 2)
EPS = 1e-12


def calibrate(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: softmax(log p / T)."""
    logits = np.log(np.clip(proba, EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood (a 1-D search on log T)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [nll(calibrate(proba, t), y) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 41))
    return float(fine[int(np.argmin([nll(calibrate(proba, t), y) for t in fine]))])


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence, equal-width bins."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [(pred[y == c] == c).mean() for c in np.unique(y)]
    return float(np.mean(recalls))


def prior_corrected(proba: np.ndarray, prior: np.ndarray, alpha: float) -> np.ndarray:
    return proba / np.clip(prior, EPS, None) ** alpha


def melanoma_threshold(p_mel: np.ndarray, is_mel: np.ndarray, target: float) -> float:
    """The highest threshold on p(mel) whose sensitivity on these rows reaches ``target``."""
    if not is_mel.any():
        raise DermrayError("The validation split has no melanoma: the melanoma policy cannot be "
                           "fitted (re-split with more data).")
    scores = np.sort(p_mel[is_mel])[::-1]
    k = int(np.ceil(target * len(scores)))  # this many melanomas must be at or above it
    return float(scores[min(k, len(scores)) - 1])


def fit_operating_points(val_proba: np.ndarray, y_val: np.ndarray, train_prior: np.ndarray,
                         melanoma_target: float = 0.90) -> dict[str, Any]:
    """Temperature and every policy's parameters, all chosen on validation."""
    if not 0.0 < melanoma_target <= 1.0:
        raise DermrayError(f"The melanoma target sensitivity must be in (0, 1]. Got "
                           f"{melanoma_target!r} instead.")
    temperature = fit_temperature(val_proba, y_val)
    cal = calibrate(val_proba, temperature)
    prior = np.asarray(train_prior, dtype=float) / np.sum(train_prior)
    scores = [_balanced_accuracy(y_val, prior_corrected(cal, prior, a).argmax(axis=1))
              for a in ALPHAS]
    alpha = float(ALPHAS[int(np.argmax(scores))])  # ties: the weakest correction
    return {
        "temperature": temperature,
        "policies": {
            "accuracy": {},
            "balanced": {"alpha": alpha, "prior": prior.round(6).tolist()},
            "melanoma": {"threshold": melanoma_threshold(cal[:, MEL], y_val == MEL,
                                                         melanoma_target),
                         "target_sensitivity": melanoma_target},
        },
    }


def decide(proba: np.ndarray, points: dict[str, Any], policy: str = "accuracy",
           calibrated: bool = False) -> np.ndarray:
    """Class indices under a policy (``proba`` raw, or already calibrated)."""
    if policy not in POLICIES:
        raise DermrayError(f"Unknown policy {policy!r}. Known policies: {', '.join(POLICIES)}.")
    cal = proba if calibrated else calibrate(proba, points["temperature"])
    spec = points["policies"][policy]
    if policy == "balanced":
        return prior_corrected(cal, np.asarray(spec["prior"]), spec["alpha"]).argmax(axis=1)
    pred = cal.argmax(axis=1)
    if policy == "melanoma":
        pred = np.where(cal[:, MEL] >= spec["threshold"], MEL, pred)
    return pred


def decision_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall, melanoma sensitivity and specificity."""
    is_mel, said_mel = y == MEL, pred == MEL
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "recall": {c: (float((pred[y == i] == i).mean()) if (y == i).any() else None)
                   for i, c in enumerate(CLASSES)},
        "melanoma_sensitivity": float(said_mel[is_mel].mean()) if is_mel.any() else None,
        "melanoma_specificity": float((~said_mel[~is_mel]).mean()) if (~is_mel).any() else None,
    }


def policy_report(proba: np.ndarray, y: np.ndarray, points: dict[str, Any]) -> dict[str, Any]:
    """Every policy's decision metrics on one split, with calibration before and after."""
    cal = calibrate(proba, points["temperature"])
    return {
        "ece_before": expected_calibration_error(proba, y),
        "ece_after": expected_calibration_error(cal, y),
        "nll_before": nll(proba, y), "nll_after": nll(cal, y),
        "policies": {name: decision_metrics(y, decide(cal, points, name, calibrated=True))
                     for name in POLICIES},
    }
