"""Head families on embeddings (or images, for ``finetune``), all with the scikit-learn contract:
``fit(X, y)`` returns self, ``predict_proba(X)``, ``classes_``; ``save(dir)`` / ``load(dir)`` in
formats that run no code on load (arrays, XGBoost UBJ, Keras ``.keras``)."""

from __future__ import annotations

from typing import Any

from dermray.heads.base import Head, HeadError, NotFittedError

FAMILIES = ("logistic", "xgboost", "mlp", "finetune")


def head_class(family: str) -> type[Head]:
    if family == "logistic":
        from dermray.heads.logistic import LogisticHead as cls
    elif family == "xgboost":
        from dermray.heads.xgb import XGBoostHead as cls
    elif family == "mlp":
        from dermray.heads.mlp import MLPHead as cls
    elif family == "finetune":
        from dermray.heads.finetune import FinetuneHead as cls
    else:
        raise HeadError(f"Unknown head family {family!r}. Known families: {', '.join(FAMILIES)}.")
    return cls


def make_head(family: str, params: dict[str, Any]) -> Head:
    return head_class(family)(**params)


def load_head(family: str, directory) -> Head:
    return head_class(family).load(directory)


__all__ = ["FAMILIES", "Head", "HeadError", "NotFittedError", "head_class", "load_head", "make_head"]
