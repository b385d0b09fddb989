"""What every head shares: parameter storage, input checks, the not-fitted error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermray.errors import DermrayError

N_CLASSES = 7
# called after each iteration of iterative heads with (iteration, val_proba); the search
# stage reports to Ray Tune from here (and ASHA may stop the trial)
ProgressFn = Callable[[int, np.ndarray], None]


class HeadError(DermrayError):
    """Bad head parameters or inputs."""


class NotFittedError(HeadError):
    """A head used before ``fit``."""


class Head:
    """Base class. ``__init__`` only stores parameters; fitted attributes end in ``_``."""

    family = "base"

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'fit' with appropriate arguments before using this head.")

    @staticmethod
    def _check_xy(X: np.ndarray, y: np.ndarray | None = None, where: str = "fit") -> None:
        if X.ndim < 2 or len(X) == 0:
            raise HeadError(f"The 'X' parameter of {where} must be a non-empty 2-D array. Got "
                            f"shape {X.shape} instead.")
        if y is not None:
            if len(y) != len(X):
                raise HeadError(f"X and y of {where} must have the same length. Got {len(X)} and "
                                f"{len(y)} instead.")
            missing = sorted(set(range(N_CLASSES)) - set(np.unique(y).tolist()))
            if missing:
                raise HeadError(f"The training labels lack class(es) {missing}; every one of the "
                                f"{N_CLASSES} classes must be in the train split.")

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _write_params(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "params.json").write_text(json.dumps(self.get_params(), indent=2))

    @staticmethod
    def _read_params(directory: Path) -> dict[str, Any]:
        return json.loads((Path(directory) / "params.json").read_text())


def class_weights(y: np.ndarray, mode: str | None) -> dict[int, float] | None:
    """``balanced`` weights (n / (k * count)) or None."""
    if mode in (None, "none"):
        return None
    if mode != "balanced":
        raise HeadError(f"class_weight must be 'balanced' or 'none'. Got {mode!r} instead.")
    counts = np.bincount(y, minlength=N_CLASSES)
    return {c: len(y) / (N_CLASSES * counts[c]) for c in range(N_CLASSES) if counts[c]}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
