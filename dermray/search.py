"""Ray Tune over every head family: a conditional space (family -> its parameters), Optuna TPE
(or random sampling, for comparison), ASHA early stopping of the iterative families, resources
per family, metric ``val_accuracy`` (max). Selection, test scoring and export are in
``dermray.select``.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermray import storage
from dermray.config import CLASSES, _check, register_section
from dermray.errors import DermrayError
from dermray.heads import FAMILIES
from dermray.raysession import ensure_ray

logger = logging.getLogger(__name__)

METRIC = "val_accuracy"
REPORTED = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_log_loss")


@dataclass(frozen=True)
class SearchConfig:
    """The head search: which families and features, how many trials, with what resources."""

    out: str = "out"
    families: tuple[str, ...] = ("logistic", "xgboost", "mlp", "finetune")
    features: tuple[str, ...] = ("resnet50", "vgg19", "resnet50+vgg19")
    num_samples: int = 24
    algorithm: str = "tpe"  # tpe (Optuna) | random
    max_concurrent: int = 2
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_finetune_trial: float = -1.0  # -1: one GPU where the cluster has GPUs, else 0
    grace_period: int = 3
    max_t: int = 100
    max_failures: int = 1
    storage_path: str = ""  # default OUT/tune; s3://bucket/prefix on a cluster
    experiment: str = "heads"
    # first trials to run, one per family, so that every family is tried even on small budgets
    seed_each_family: bool = True
    mlp_max_epochs: int = 60
    xgb_max_estimators: int = 400
    finetune_backbones: tuple[str, ...] = ("resnet50",)
    finetune_weights: dict[str, str] = field(default_factory=dict)
    finetune_image_size: int = 224
    finetune_epochs: int = 10
    finetune_max_train_images: int = 0  # 0: all (a cluster); small on a laptop

    def __post_init__(self) -> None:
        from dermray.features import parse_features

        _check(len(self.families) > 0, "search", "families", self.families,
               f"a non-empty list of {', '.join(FAMILIES)}")
        for fam in self.families:
            _check(fam in FAMILIES, "search", "families", fam, f"one of {', '.join(FAMILIES)}")
        embedding_families = [f for f in self.families if f != "finetune"]
        _check(not embedding_families or len(self.features) > 0, "search", "features",
               self.features, "non-empty when an embedding family is searched")
        for spec in self.features:
            parse_features(spec)
        _check(self.algorithm in ("tpe", "random"), "search", "algorithm", self.algorithm,
               "'tpe' or 'random'")
        for key in ("num_samples", "max_concurrent", "grace_period", "max_t", "mlp_max_epochs",
                    "xgb_max_estimators", "finetune_image_size", "finetune_epochs"):
            _check(getattr(self, key) >= 1, "search", key, getattr(self, key), ">= 1")
        _check(self.max_failures >= 0, "search", "max_failures", self.max_failures, ">= 0")
        _check(self.cpus_per_trial > 0, "search", "cpus_per_trial", self.cpus_per_trial, "> 0")


register_section("search", SearchConfig)


def define_space(trial, cfg: SearchConfig) -> dict[str, Any] | None:
    """The conditional space, define-by-run: the family first, then only its parameters."""
    family = trial.suggest_categorical("family", list(cfg.families))
    if family != "finetune":
        trial.suggest_categorical("features", list(cfg.features))
    if family == "logistic":
        trial.suggest_float("logistic_C", 1e-4, 10.0, log=True)
        trial.suggest_categorical("logistic_class_weight", ["none", "balanced"])
    elif family == "xgboost":
        trial.suggest_int("xgboost_max_depth", 2, 8)
        trial.suggest_float("xgboost_learning_rate", 0.02, 0.3, log=True)
        trial.suggest_float("xgboost_subsample", 0.5, 1.0)
        trial.suggest_float("xgboost_colsample_bytree", 0.2, 1.0)
        trial.suggest_float("xgboost_min_child_weight", 0.5, 10.0, log=True)
        trial.suggest_float("xgboost_reg_lambda", 0.1, 10.0, log=True)
    elif family == "mlp":
        trial.suggest_int("mlp_layers", 1, 3)
        trial.suggest_categorical("mlp_width", [128, 256, 512, 1024])
        trial.suggest_float("mlp_dropout", 0.0, 0.6)
        trial.suggest_float("mlp_learning_rate", 1e-4, 3e-3, log=True)
        trial.suggest_categorical("mlp_class_weight", ["none", "balanced"])
    elif family == "finetune":
        trial.suggest_categorical("finetune_backbone", list(cfg.finetune_backbones))
        trial.suggest_int("finetune_unfreeze_blocks", 0, 2)
        trial.suggest_float("finetune_learning_rate", 1e-5, 1e-3, log=True)
        trial.suggest_float("finetune_dropout", 0.0, 0.5)
    return None


def head_params(config: dict[str, Any], cfg: SearchConfig) -> dict[str, Any]:
    """A trial's config -> the head's constructor arguments (fixed settings added)."""
    family = config["family"]
    prefix = family + "_"
    params = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    if family == "xgboost":
        params.update(n_estimators=cfg.xgb_max_estimators, early_stopping_rounds=20,
                      n_jobs=max(1, int(cfg.cpus_per_trial)))
    elif family == "mlp":
        params.update(epochs=cfg.mlp_max_epochs, patience=5, seed=cfg.seed)
    elif family == "finetune":
        backbone = params["backbone"]
        params.update(weights=cfg.finetune_weights.get(backbone, "imagenet"),
                      image_size=cfg.finetune_image_size, epochs=cfg.finetune_epochs,
                      patience=3, seed=cfg.seed, batch_size=16)
    return params


def first_points(cfg: SearchConfig) -> list[dict[str, Any]]:
    """One sensible trial per family, evaluated first, so that no family goes untried."""
    points = []
    feats = cfg.features[0] if cfg.features else None
    defaults = {
        "logistic": {"logistic_C": 0.1, "logistic_class_weight": "none"},
        "xgboost": {"xgboost_max_depth": 4, "xgboost_learning_rate": 0.1, "xgboost_subsample": 0.8,
                    "xgboost_colsample_bytree": 0.5, "xgboost_min_child_weight": 1.0,
                    "xgboost_reg_lambda": 1.0},
        "mlp": {"mlp_layers": 1, "mlp_width": 256, "mlp_dropout": 0.3,
                "mlp_learning_rate": 1e-3, "mlp_class_weight": "none"},
        "finetune": {"finetune_backbone": cfg.finetune_backbones[0],
                     "finetune_unfreeze_blocks": 1, "finetune_learning_rate": 1e-4,
                     "finetune_dropout": 0.3},
    }
    for fam in cfg.families:
        point = {"family": fam, **defaults[fam]}
        if fam != "finetune":
            point["features"] = feats
        points.append(point)
    return points


def val_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from dermray.evaluate import metrics

    m = metrics(y, proba)
    return {"val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
            "val_macro_f1": m["macro_f1"], "val_log_loss": m["log_loss"]}


def train_head(config: dict[str, Any], data: dict[str, Any], cfg: SearchConfig) -> None:
    """The Tune trainable: fit one head, report val metrics per iteration, checkpoint at the end."""
    from ray import tune

    from dermray.heads import make_head

    family = config["family"]
    key = "images" if family == "finetune" else config["features"]
    X_train, y_train, X_val, y_val = data[key]
    head = make_head(family, head_params(config, cfg))
    tags = {"family": family, "features": key}

    def progress(iteration: int, proba: np.ndarray) -> None:
        tune.report({**val_metrics(y_val, proba), **tags})

    head.fit(X_train, y_train, eval_set=(X_val, y_val),
             progress=progress if family in ("xgboost", "mlp", "finetune") else None)
    final = val_metrics(y_val, head.predict_proba(X_val))
    with tempfile.TemporaryDirectory() as tmp:
        head.save(Path(tmp))
        tune.report({**final, **tags, "final": True},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def load_search_data(cfg: SearchConfig, manifest_path: str) -> dict[str, Any]:
    """Train and val arrays per feature spec (and images, when finetune is searched)."""
    from dermray.catalog import read_manifest
    from dermray.features import embedding_features, image_arrays

    data: dict[str, Any] = {}
    if any(f != "finetune" for f in cfg.families):
        for spec in cfg.features:
            X_tr, y_tr, _ = embedding_features(cfg.out, spec, "train")
            X_va, y_va, _ = embedding_features(cfg.out, spec, "val")
            data[spec] = (X_tr, y_tr, X_va, y_va)
    if "finetune" in cfg.families:
        manifest = read_manifest(manifest_path)
        X_tr, y_tr, _ = image_arrays(manifest, "train", cfg.finetune_image_size,
                                     cfg.finetune_max_train_images, cfg.seed)
        X_va, y_va, _ = image_arrays(manifest, "val", cfg.finetune_image_size)
        data["images"] = (X_tr, y_tr, X_va, y_va)
    for key, (_, y_tr, _, y_va) in data.items():
        for split, y in (("train", y_tr), ("val", y_va)):
            missing = sorted(set(range(len(CLASSES))) - set(np.unique(y).tolist()))
            if missing:
                raise DermrayError(f"The {split} split of '{key}' lacks class(es) "
                                   f"{', '.join(CLASSES[i] for i in missing)}; every class must be "
                                   "in every split (re-split with more data, or another seed).")
    return data


def storage_path(cfg: SearchConfig) -> str:
    """Where Tune keeps the experiment: search.storage_path, else OUT/tune (a folder or URI)."""
    if cfg.storage_path:
        return cfg.storage_path
    return storage.join(cfg.out, "tune") if storage.is_remote(cfg.out) else str(
        Path(cfg.out, "tune").resolve())


def tune_storage(cfg: SearchConfig) -> tuple[str, Any]:
    """Tune's storage path and filesystem: a URI's own filesystem (so that its query, such as
    an S3 endpoint, is honoured) with the path inside it; locally the folder and None."""
    uri = storage_path(cfg)
    if storage.is_remote(uri):
        fs, path = storage.open_fs(uri)
        return path, fs
    return uri, None


def build_tuner(cfg: SearchConfig, data: dict[str, Any], resume: bool = True):
    """The Tuner, restored from its storage path when an earlier run of it is there."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    finetune_gpus = cfg.gpus_per_finetune_trial if cfg.gpus_per_finetune_trial >= 0 else (
        1.0 if gpus else 0.0)

    def resources(config: dict[str, Any]) -> dict[str, float]:
        if config.get("family") == "finetune":
            return {"CPU": cfg.cpus_per_trial, "GPU": finetune_gpus}
        return {"CPU": cfg.cpus_per_trial, "GPU": 0}

    trainable = tune.with_resources(
        tune.with_parameters(train_head, data=data, cfg=cfg), resources=resources)
    root, filesystem = tune_storage(cfg)
    path = f"{root.rstrip('/')}/{cfg.experiment}"
    if resume and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        logger.info("resuming the Tune experiment at %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=filesystem)
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(4, len(cfg.families)))
               if cfg.algorithm == "tpe" else optuna.samplers.RandomSampler(seed=cfg.seed))
    # a partial of a module-level function pickles (Tune saves the searcher to resume it)
    search = OptunaSearch(space=functools.partial(define_space, cfg=cfg), metric=METRIC, mode="max",
                          sampler=sampler,
                          points_to_evaluate=first_points(cfg) if cfg.seed_each_family else None)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_t,
                              grace_period=cfg.grace_period, reduction_factor=3)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.num_samples,
                                    search_alg=ConcurrencyLimiter(search, cfg.max_concurrent),
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=cfg.experiment, storage_path=root,
                                  storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  verbose=0),
    )


def run_search(cfg: SearchConfig, manifest_path: str, resume: bool = True):
    """Run (or resume) the experiment; returns the ResultGrid."""

    ensure_ray()
    data = load_search_data(cfg, manifest_path)
    tuner = build_tuner(cfg, data, resume=resume)
    return tuner.fit()

