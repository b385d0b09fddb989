"""Gradient-boosted trees (XGBoost ``hist``, on the ``device`` it is given), saved as UBJ."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dermray.io.fingerprint import OUTPUT
from dermray.models.heads.base import (
    CLASS_WEIGHT,
    N_CLASSES,
    Head,
    HeadError,
    Rule,
    class_weights,
    integer,
    real,
)
from dermray.models.heads.registry import FamilySpec, Setting, at_least, register_family

if TYPE_CHECKING:
    from dermray.config import SearchConfig


class XGBoostHead(Head):
    family = "xgboost"
    rules: ClassVar[dict[str, Rule]] = {"max_depth": integer(1), "learning_rate": real(0, None, low_open=True),
             "n_estimators": integer(1), "subsample": real(0, 1, low_open=True),
             "colsample_bytree": real(0, 1, low_open=True), "min_child_weight": real(0),
             "reg_lambda": real(0), "early_stopping_rounds": integer(0),
             "class_weight": CLASS_WEIGHT, "report_every": integer(1), "n_jobs": integer(0),
             "device": Rule(lambda v: isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda"),
                            "'cpu', 'cuda' or 'cuda:<ordinal>'")}

    def __init__(self, max_depth: int = 6, learning_rate: float = 0.1, n_estimators: int = 300,
                 subsample: float = 1.0, colsample_bytree: float = 1.0,
                 min_child_weight: float = 1.0, reg_lambda: float = 1.0,
                 early_stopping_rounds: int = 20, class_weight: str = "none",
                 report_every: int = 10, n_jobs: int = 0, device: str = "cpu") -> None:
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.n_estimators = n_estimators
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.class_weight = class_weight
        self.report_every = report_every
        self.n_jobs = n_jobs
        self.device = device

    def _model(self, **extra):
        import xgboost as xgb

        return xgb.XGBClassifier(
            max_depth=self.max_depth, learning_rate=self.learning_rate,
            n_estimators=self.n_estimators, subsample=self.subsample,
            colsample_bytree=self.colsample_bytree, min_child_weight=self.min_child_weight,
            reg_lambda=self.reg_lambda, tree_method="hist", objective="multi:softprob",
            num_class=N_CLASSES, device=self.device,
            n_jobs=self.n_jobs or None, random_state=0, **extra)

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set=None, progress=None) -> XGBoostHead:
        import xgboost as xgb

        self._check_params()
        self._check_xy(X, y)
        if self.early_stopping_rounds and eval_set is None:
            raise HeadError("XGBoostHead with early_stopping_rounds needs eval_set=(X_val, y_val).")
        callbacks = []
        if progress is not None and eval_set is not None:
            head = self

            class Report(xgb.callback.TrainingCallback):
                def after_iteration(self, model, epoch, evals_log):
                    if (epoch + 1) % head.report_every == 0:
                        dval = xgb.DMatrix(eval_set[0])
                        progress((epoch + 1) // head.report_every,
                                 model.predict(dval, iteration_range=(0, epoch + 1)))
                    return False

            callbacks.append(Report())
        model = self._model(early_stopping_rounds=self.early_stopping_rounds or None,
                            eval_metric="mlogloss", callbacks=callbacks or None)
        weights = class_weights(y, self.class_weight)
        sample_weight = np.asarray([weights[c] for c in y]) if weights else None
        model.fit(X, y, sample_weight=sample_weight,
                  eval_set=[tuple(eval_set)] if eval_set is not None else None, verbose=False)
        self.model_ = model
        self._set_fitted(X)
        self.best_iteration_ = int(getattr(model, "best_iteration", self.n_estimators - 1) or 0)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        self._check_xy(np.asarray(X), where="predict_proba")
        self._check_n_features(X)
        return self.model_.predict_proba(np.asarray(X, dtype=np.float32))

    def save(self, directory: Path) -> None:
        self._check_fitted()
        directory = Path(directory)
        self._write_params(directory)
        self.model_.save_model(directory / "xgboost.ubj")

    @classmethod
    def load(cls, directory: Path) -> XGBoostHead:
        # a loaded model predicts on the CPU, wherever it was trained (the device is the trial's)
        head = cls(**{**cls._read_params(directory), "device": "cpu"})
        model = head._model()
        model.load_model(Path(directory) / "xgboost.ubj")
        head.model_, head.classes_ = model, np.arange(N_CLASSES)
        head.n_features_in_ = int(model.get_booster().num_features())
        return head


def _space(trial: Any, cfg: SearchConfig) -> None:
    trial.suggest_int("xgboost_max_depth", 2, 8)
    trial.suggest_float("xgboost_learning_rate", 0.02, 0.3, log=True)
    trial.suggest_float("xgboost_subsample", 0.5, 1.0)
    trial.suggest_float("xgboost_colsample_bytree", 0.2, 1.0)
    trial.suggest_float("xgboost_min_child_weight", 0.5, 10.0, log=True)
    trial.suggest_float("xgboost_reg_lambda", 0.1, 10.0, log=True)


def _first_point(cfg: SearchConfig) -> dict[str, Any]:
    return {"xgboost_max_depth": 4, "xgboost_learning_rate": 0.1, "xgboost_subsample": 0.8,
            "xgboost_colsample_bytree": 0.5, "xgboost_min_child_weight": 1.0,
            "xgboost_reg_lambda": 1.0}


MAX_ESTIMATORS = Setting("xgb_max_estimators", 400, int, OUTPUT, at_least(1),
                         "boosting rounds per trial (early stopping may end it sooner)")


def _fixed(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    return {"n_estimators": MAX_ESTIMATORS.read(cfg), "early_stopping_rounds": 20,
            "n_jobs": max(1, int(cfg.cpus_per_trial))}


def _resources(cfg: SearchConfig, cluster_has_gpus: bool) -> dict[str, float]:
    # one GPU per trial where the cluster has them: XGBoost's CUDA hist is many times faster
    return {"CPU": cfg.cpus_per_trial, "GPU": 1.0 if cluster_has_gpus else 0}


def _device(has_gpu: bool) -> dict[str, Any]:
    return {"device": "cuda" if has_gpu else "cpu"}


SPEC = register_family(FamilySpec(
    "xgboost", XGBoostHead, space=_space, first_point=_first_point, fixed_params=_fixed,
    resources=_resources, device_params=_device, iterative=True,
    settings=(MAX_ESTIMATORS,), packages=("xgboost",)))
