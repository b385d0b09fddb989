"""What every head shares: the scikit-learn estimator contract (``__init__`` stores parameters,
``fit`` validates them, ``get_params`` / ``set_params``, fitted attributes ending in ``_``), input
checks, the not-fitted error."""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from dermray.domain import CLASSES
from dermray.errors import DermrayError

N_CLASSES = len(CLASSES)
# called after each iteration of iterative heads with (iteration, val_proba), and by heads that
# train by epochs with the epoch's training loss as ``train_loss=`` too; the search stage
# reports to Ray Tune from here (and ASHA may stop the trial)
ProgressFn = Callable[..., None]


class HeadError(DermrayError):
    """Bad head parameters or inputs."""


class NotFittedError(HeadError):
    """A head used before ``fit``."""


@dataclass(frozen=True)
class Rule:
    """What one parameter must be: a test and the words for it (scikit-learn's message form)."""

    ok: Callable[[Any], bool]
    must: str


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An int in [low, high] (either end may be open-ended: None)."""
    words = f"an int in the range [{low if low is not None else '-inf'}, " \
            f"{high if high is not None else 'inf'}]"
    return Rule(lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
                and (low is None or v >= low) and (high is None or v <= high), words)


def real(low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> Rule:
    """A float (or int) in the range, ends closed unless ``*_open``."""
    words = (f"a float in the range {'(' if low_open or low is None else '['}"
             f"{low if low is not None else '-inf'}, {high if high is not None else 'inf'}"
             f"{')' if high_open or high is None else ']'}")

    def ok(v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or np.isnan(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(ok, words)


def one_of(*options: Any) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


BOOLEAN = Rule(lambda v: isinstance(v, (bool, np.bool_)), "an instance of 'bool'")
CLASS_WEIGHT = one_of("none", "balanced")


# what ``Head.differentiable_scores`` answers: the head's pre-softmax class scores as a function
# Grad-CAM can take the gradient of (dermray.report.explain); a head with neither is explained by
# occlusion
@dataclass(frozen=True)
class LinearScores:
    """The class scores are a linear map of the input features: ``X @ weights + bias``
    (``weights``: n_features x n_classes), any standardisation folded in."""

    weights: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class KerasScores:
    """The head is a Keras model whose last layer is Dense: the class scores are that layer's
    input times its kernel plus its bias."""

    model: Any


class Head(BaseEstimator):
    """Base class. ``__init__`` only stores parameters; ``fit`` validates them against ``rules``
    and sets ``classes_`` and ``n_features_in_``; fitted attributes end in ``_``."""

    family = "base"
    # parameter name -> what it must be; checked at the start of fit
    rules: ClassVar[dict[str, Rule]] = {}

    def _check_params(self) -> None:
        for name, rule in self.rules.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise HeadError(f"The '{name}' parameter of {type(self).__name__} must be "
                                f"{rule.must}. Got {value!r} instead.")

    def _set_fitted(self, X: np.ndarray) -> None:
        """Fitted attributes every head has: the classes and the number of features seen."""
        self.classes_ = np.arange(N_CLASSES)
        self.n_features_in_ = int(np.prod(np.shape(X)[1:]))

    def _check_n_features(self, X: np.ndarray) -> None:
        n = int(np.prod(np.shape(X)[1:]))
        if n != self.n_features_in_:
            raise HeadError(f"X has {n} features, but {type(self).__name__} is expecting "
                            f"{self.n_features_in_} features as input.")

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

    # the file its numeric arrays are saved in ('' for a head that saves none as arrays)
    arrays_file: ClassVar[str] = ""

    def declared_arrays(self, n_features: int, n_classes: int
                        ) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
        """The fitted numeric arrays, each with the shape a head of ``n_features`` inputs and
        ``n_classes`` outputs must give it: a bundle checks them at load (finite, that shape).
        None here; a head that saves arrays names them."""
        return {}

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def differentiable_scores(self) -> LinearScores | KerasScores | None:
        """How the fitted head's class scores can be differentiated, for Grad-CAM; None (the
        default: trees, or any head of unknown form) means explain it by occlusion."""
        return None

    def _write_params(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "params.json").write_text(json.dumps(self.get_params(deep=False), indent=2))

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
