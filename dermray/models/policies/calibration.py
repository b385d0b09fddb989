"""Temperature scaling, fitted on validation: the calibrated probabilities every decision policy
starts from (``p ** (1/T)``, renormalised: the softmax of ``log p / T``), and the two figures that
show it worked (negative log-likelihood, expected calibration error). Pure numpy."""

from __future__ import annotations

import numpy as np

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
