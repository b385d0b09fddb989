"""The soft-vote ensemble: a weighted mean of several fitted heads' probabilities.

**Weights.** ``fit_weights`` puts one weight per member on the simplex (non-negative, summing
to 1: M - 1 degrees of freedom) and minimises the multi-class log-loss of the mixed
probabilities on the rows given. Log-loss is a smooth proper score and is convex in the weights
(minus the log of a linear function), so the optimum is found from any start (SLSQP from equal
weights); a member that adds nothing gets a weight at (or near) 0. The weights are never fitted
to accuracy, the number the ensemble is then compared by.

**Its validation accuracy, out of fold.** Fitting the weights on validation and scoring them on
the same rows would flatter the ensemble against the single trials. ``out_of_fold`` splits
validation into ``K`` folds grouped by lesion (no lesion in two folds; stratified by class where
the groups allow), fits the weights on the other ``K - 1`` folds, mixes the held-out fold's
probabilities with them, and scores the accuracy of those out-of-fold predictions: no weight
ever sees the rows it is scored on. The ensemble's final weights are then fitted on all of
validation (``fit_weights``), and its calibration and operating points are fitted on the
validation probabilities those weights give, as a single trial's are.

``EnsembleHead`` is the fitted model: the members' heads and the weights; it takes one input
array per member (each member's own features) and has no gradient (``dermray explain`` explains
it by occlusion over the ensemble's probability).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from dermray.errors import DermrayError
from dermray.models.heads import load_head

ENSEMBLE = "ensemble"  # the family name an ensemble bundle records
FOLDS = 5  # K of the out-of-fold estimate
EPS = 1e-12


def mix(probas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of the members' probabilities (each (N, C))."""
    return np.tensordot(np.asarray(weights, dtype=np.float64),
                        np.stack([np.asarray(p, dtype=np.float64) for p in probas]), axes=1)


def fit_weights(probas: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Weights on the simplex minimising the log-loss of ``mix(probas, w)`` against ``y``."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (M, N, C)
    y = np.asarray(y)
    m = len(stacked)
    if m == 1:
        return np.ones(1)
    true = stacked[:, np.arange(len(y)), y].T  # (N, M): each member's probability of the truth

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        p = np.clip(true @ w, EPS, None)
        return float(-np.mean(np.log(p))), -(true / p[:, None]).mean(axis=0)

    start = np.full(m, 1.0 / m)
    result = minimize(loss, start, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                    "jac": lambda w: np.ones_like(w)}],
                      options={"ftol": 1e-10, "maxiter": 500})
    w = np.clip(result.x if np.all(np.isfinite(result.x)) else start, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if loss(w)[0] <= loss(start)[0] else start  # never worse than the plain mean


def lesion_folds(y: np.ndarray, groups: np.ndarray, k: int = FOLDS,
                 seed: int = 0) -> list[np.ndarray]:
    """Held-out row indices of ``k`` folds (fewer where there are fewer lesions), grouped by
    ``groups`` (lesion_id: no lesion in two folds) and stratified by class where possible."""
    groups = np.asarray(groups)
    k = min(k, len(np.unique(groups)))
    if k < 2:
        raise DermrayError("The ensemble's out-of-fold estimate needs at least 2 lesions in "
                           "the validation split.")
    X, y = np.zeros(len(y)), np.asarray(y)
    if np.bincount(y).max() < k:  # no class has k rows: nothing to stratify, lesions only
        return [held for _, held in GroupKFold(n_splits=k).split(X, y, groups)]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a rare class with fewer lesions than folds: fine here
        warnings.simplefilter("ignore", UserWarning)
        return [held for _, held in splitter.split(X, y, groups)]


@dataclass
class OutOfFold:
    """The out-of-fold estimate: the mixed held-out probabilities, their accuracy and
    log-loss, and each fold's held-out rows and weights."""

    proba: np.ndarray
    accuracy: float
    log_loss: float
    folds: list[np.ndarray]
    fold_weights: list[np.ndarray]


def out_of_fold(probas: Sequence[np.ndarray], y: np.ndarray, groups: np.ndarray,
                k: int = FOLDS, seed: int = 0,
                fit: Callable[[list[np.ndarray], np.ndarray], np.ndarray] = fit_weights
                ) -> OutOfFold:
    """Weights fitted on K-1 lesion-grouped folds, applied to the held-out one, for each fold;
    the accuracy of the held-out predictions (see the module docstring)."""
    y = np.asarray(y)
    folds = lesion_folds(y, groups, k, seed)
    proba = np.zeros_like(np.asarray(probas[0], dtype=np.float64))
    fold_weights = []
    for held in folds:
        rest = np.setdiff1d(np.arange(len(y)), held)
        w = np.asarray(fit([np.asarray(p)[rest] for p in probas], y[rest]), dtype=np.float64)
        proba[held] = mix([np.asarray(p)[held] for p in probas], w)
        fold_weights.append(w)
    truth = np.clip(proba[np.arange(len(y)), y], EPS, None)
    return OutOfFold(proba=proba, accuracy=float(np.mean(proba.argmax(axis=1) == y)),
                     log_loss=float(-np.mean(np.log(truth))), folds=folds,
                     fold_weights=fold_weights)


class EnsembleHead:
    """Fitted member heads and their weights: ``predict_proba`` takes one array per member (its
    own features, in the members' order) and returns the weighted mean of their probabilities.

    Saved as ``<dir>/<i>/`` per member, each in its own family's format (no code runs on
    load); the families and weights are the bundle's record (bundle.json), not this folder's."""

    def __init__(self, heads: Sequence[Any], weights: Sequence[float],
                 families: Sequence[str]) -> None:
        if not (len(heads) == len(weights) == len(families) >= 2):
            raise DermrayError("An ensemble needs 2 or more members, each with a weight.")
        self.heads, self.weights, self.families = list(heads), list(weights), list(families)

    def predict_proba(self, X: Sequence[Any]) -> np.ndarray:
        if len(X) != len(self.heads):
            raise DermrayError(f"The ensemble takes {len(self.heads)} inputs (one per member), "
                               f"got {len(X)}.")
        return mix([h.predict_proba(x) for h, x in zip(self.heads, X, strict=True)],
                   self.weights)

    def differentiable_scores(self) -> Any:
        """None: a mixture of probabilities has no single pre-softmax score to differentiate;
        ``dermray explain`` uses occlusion over the ensemble's probability."""
        return None

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for i, head in enumerate(self.heads):
            head.save(directory / str(i))

    @classmethod
    def load(cls, directory: str | Path, families: Sequence[str],
             weights: Sequence[float]) -> EnsembleHead:
        directory = Path(directory)
        return cls([load_head(f, directory / str(i)) for i, f in enumerate(families)], weights,
                   families)
