"""Head families on embeddings (or images), all with the scikit-learn contract: ``fit(X, y)``
returns self, ``predict_proba(X)``, ``classes_``, ``get_params`` / ``set_params``; ``save(dir)`` /
``load(dir)`` in formats that run no code on load (arrays, XGBoost UBJ, Keras ``.keras``).

Each family registers a ``FamilySpec`` beside its class (``dermray.models.heads.registry``); importing
this package registers the built-in ones, in this order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# isort: off
# importing a family's module registers it; this order is the order families are listed in
from dermray.models.heads import logistic  # noqa: F401
from dermray.models.heads import xgb  # noqa: F401
from dermray.models.heads import mlp  # noqa: F401
from dermray.models.heads import finetune  # noqa: F401
from dermray.models.heads import cached  # noqa: F401
# isort: on
from dermray.models.heads.base import Head, HeadError, NotFittedError
from dermray.models.heads.registry import (
    ACTIVATIONS,
    EMBEDDINGS,
    FAMILY_SPECS,
    IMAGES,
    FamilySpec,
    families,
    get_family,
    param_prefixes,
    register_family,
    unregister_family,
)

# the built-in families, in the order they are searched by default
FAMILIES: tuple[str, ...] = families()


def head_class(family: str) -> type[Head]:
    return get_family(family).head_class


def make_head(family: str, params: dict[str, Any]) -> Head:
    return head_class(family)(**params)


def load_head(family: str, directory: str | Path) -> Head:
    return head_class(family).load(Path(directory))


__all__ = ["ACTIVATIONS", "EMBEDDINGS", "FAMILIES", "FAMILY_SPECS", "IMAGES", "FamilySpec", "Head", "HeadError",
           "NotFittedError", "families", "get_family", "head_class", "load_head", "make_head",
           "param_prefixes", "register_family", "unregister_family"]
