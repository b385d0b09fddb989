"""Ray Tune over every head family: a conditional space (family -> its parameters), Optuna TPE
(or random sampling, for comparison), ASHA early stopping of the iterative families, resources
per family, metric ``val_accuracy`` (max). Selection, test scoring and export are in
``dermray.stages.select``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermray.config import SearchConfig, output_settings
from dermray.data.catalog import frame_hash, read_manifest
from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import faults, storage
from dermray.io.fingerprint import FILE, check_claim, claim, make, read_fingerprint
from dermray.models.embeddings import backbone_dir
from dermray.models.features import (
    activation_features,
    embedding_features,
    image_arrays,
    parse_features,
)
from dermray.models.heads import ACTIVATIONS, EMBEDDINGS, IMAGES, FamilySpec, get_family
from dermray.report.evaluate import metrics
from dermray.stages.console import quiet_libraries, route_foreign_logs, verbose
from dermray.stages.progress import tune_callback_base, tune_callbacks
from dermray.stages.raysession import check_resources, ensure_ray, keep_credentials_out_of_tune
from dermray.stages.tracking import hparams_logger

logger = logging.getLogger(__name__)

METRIC = "val_accuracy"
REPORTED = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_log_loss")


def define_space(trial, cfg: SearchConfig) -> dict[str, Any] | None:
    """The conditional space, define-by-run: the family first, then only its parameters."""
    spec = get_family(trial.suggest_categorical("family", list(cfg.families)))
    if spec.input == EMBEDDINGS:
        trial.suggest_categorical("features", list(cfg.features))
    spec.space(trial, cfg)
    if spec.input == ACTIVATIONS:  # a constant, or as the family's searched parameters say
        return {"features": spec.activation_input(cfg, trial.params)}
    return None


def head_params(config: dict[str, Any], cfg: SearchConfig, has_gpu: bool = False) -> dict[str, Any]:
    """A trial's config -> the head's constructor arguments (fixed settings added)."""
    return get_family(config["family"]).head_params(config, cfg, has_gpu)


def first_points(cfg: SearchConfig) -> list[dict[str, Any]]:
    """One sensible trial per family, evaluated first, so that no family goes untried."""
    points = []
    feats = cfg.features[0] if cfg.features else None
    for fam in cfg.families:
        spec = get_family(fam)
        point = {"family": fam, **spec.first_point(cfg)}
        if spec.input == EMBEDDINGS:
            point["features"] = feats
        elif spec.input == ACTIVATIONS:
            point["features"] = spec.activation_input(cfg, point)
        points.append(point)
    return points


def val_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:

    m = metrics(y, proba)
    return {"val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
            "val_macro_f1": m["macro_f1"], "val_log_loss": m["log_loss"]}


def train_head(config: dict[str, Any], data: dict[str, Any], cfg: SearchConfig,
               specs: dict[str, FamilySpec]) -> None:
    """The Tune trainable: fit one head, report val metrics per iteration, checkpoint at the end.

    ``specs`` travel with the trainable, so a family registered only in the driver runs too."""
    import ray
    from ray import tune

    spec = specs[config["family"]]
    key = spec.features_of(config)
    X_train, y_train, X_val, y_val = data[key]
    tags = {"family": spec.name, "features": key}

    delivered: dict[str, float] = {}

    def progress(iteration: int, proba: np.ndarray, train_loss: float | None = None,
                 snapshot: Callable[[Path], None] | None = None) -> None:
        """One report per iteration. A head that keeps its best iteration (the Keras heads'
        stopping rule restores the best epoch) passes ``snapshot`` when this iteration is that
        best: the report then carries those weights as a checkpoint, and the trial's val_*
        stay the figures of the model it would hand over now (this iteration's own are
        ``epoch_val_*``). So ASHA compares what a trial would deliver, and a trial it stops
        keeps its best model: selection loads it instead of refitting."""
        current = val_metrics(y_val, proba)
        train = {} if train_loss is None else {"train_loss": train_loss}
        epoch = {f"epoch_{k}": v for k, v in current.items()}
        if snapshot is None:
            tune.report({**(delivered or current), **epoch, **train, **tags})
            return
        delivered.update(current)
        with tempfile.TemporaryDirectory() as tmp:
            snapshot(Path(tmp))
            tune.report({**current, **epoch, **train, **tags},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    restored = tune.get_checkpoint()
    if restored is not None:
        # a trial Tune restarts (its worker died: a crash, a kill for memory) after it reported
        # a best epoch: the trial ends with that epoch's model instead of training again from
        # the start, which would report epoch 1 under Tune's next iteration number, replace the
        # kept best with a worse one and mix two trainings in one trial's results
        with restored.as_directory() as directory:
            head = spec.head_class.load(Path(directory))
        tags = {**tags, "resumed_from_checkpoint": True}
    else:
        head = spec.head_class(**spec.head_params(config, cfg,
                                                  has_gpu=bool(ray.get_gpu_ids())))
        head.fit(X_train, y_train, eval_set=(X_val, y_val),
                 progress=progress if spec.iterative else None)
    final = val_metrics(y_val, head.predict_proba(X_val))
    with tempfile.TemporaryDirectory() as tmp:
        head.save(Path(tmp))
        tune.report({**final, **tags, "final": True},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def head_inputs(spec: FamilySpec, cfg: SearchConfig, features: str, split: str,
                manifest_path: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """X, y and the rows of one split, in the input kind the family takes: embeddings of a
    feature spec, the decoded images of the manifest (unreadable ones left out), or an
    activation-map backbone's cached maps (every view to train on, the original ones to score;
    with ``+meta``, rows of the flattened map and the metadata columns)."""

    if spec.input == ACTIVATIONS:
        return activation_features(cfg.out, features, split)
    if spec.input == IMAGES:
        X, y, frame = image_arrays(read_manifest(manifest_path), split, spec.image_size(cfg),
                                   limit, cfg.seed)
        return X, y, frame[~frame["error"].astype(bool)]
    return embedding_features(cfg.out, features, split)


def load_search_data(cfg: SearchConfig, manifest_path: str) -> dict[str, Any]:
    """Train and val arrays per input: each feature spec, and images when a family takes them."""
    data: dict[str, Any] = {}
    for fam in cfg.families:
        spec = get_family(fam)
        for key in spec.input_key(cfg):
            if key not in data:
                X_tr, y_tr, _ = head_inputs(spec, cfg, key, "train", manifest_path,
                                            spec.max_train_images(cfg))
                X_va, y_va, _ = head_inputs(spec, cfg, key, "val", manifest_path)
                data[key] = (X_tr, y_tr, X_va, y_va)
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


def trial_config(cfg: SearchConfig) -> SearchConfig:
    """The config a trial gets: a local OUT as an absolute path. A trial runs in its own
    folder (Tune's trial directory is its working directory), so a relative OUT, as `--out
    out/ham10000` gives it, would name nothing there: the cached fine-tune's weights lookup
    (OUT/extract_run.json) then fell back to Keras' download."""
    if storage.is_remote(cfg.out):
        return cfg
    return dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))


def build_tuner(cfg: SearchConfig, data: dict[str, Any], resume: bool = True):
    """The Tuner, restored from its storage path when an earlier run of it is there."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    quiet_libraries(verbose())  # before a restore too: no Tune table, no /tmp/ray TB hint
    route_foreign_logs()  # Optuna's own console handler, made on its import
    has_gpus = bool(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else False
    keep_credentials_out_of_tune()
    specs = {fam: get_family(fam) for fam in cfg.families}

    def resources(config: dict[str, Any]) -> dict[str, float]:
        return specs[config["family"]].resources(cfg, has_gpus)

    trainable = tune.with_resources(
        tune.with_parameters(train_head, data=data, cfg=trial_config(cfg), specs=specs),
        resources=resources)
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
    scheduler = (FIFOScheduler() if cfg.deterministic else
                 ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_t,
                               grace_period=cfg.grace_period, reduction_factor=3))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.num_samples,
                                    search_alg=ConcurrencyLimiter(search, cfg.max_concurrent,
                                                                 batch=cfg.deterministic),
                                    scheduler=scheduler,
                                    time_budget_s=cfg.time_budget_minutes * 60 or None),
        run_config=tune.RunConfig(name=cfg.experiment, storage_path=root,
                                  storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  # a trial's checkpoints are its best iteration so far and its
                                  # final model: the newest is the one selection loads
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  # our progress lines (and MLflow) replace Tune's own output
                                  callbacks=[*tune_callbacks(cfg), TrialFaults(),
                                             *hparams_logger(cfg)], verbose=0),
    )


class TrialFaults(tune_callback_base()):
    """Where the search stage sees a trial finish: the fault-matrix crash point ``search``
    (dermray.io.faults), after the progress line of that trial."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        faults.point("search")


# the libraries whose versions change the search's numbers; each searched family's own packages
# are added (dermray.models.heads.FamilySpec.packages)
SEARCH_PACKAGES = ("scikit-learn", "xgboost", "keras", "tensorflow", "tensorflow-cpu", "optuna",
                   "numpy", "ray")


def search_fingerprint(cfg: SearchConfig, manifest_path: str,
                       extracting: dict[str, str] | None = None) -> dict[str, Any]:
    """What a Tune experiment is made of: the search settings declared to change its output,
    the manifest's content and the fingerprints of the embeddings it reads (``extracting``:
    backbone -> the fingerprint key its extraction, still to run, will write)."""
    settings = output_settings(cfg)  # each family's own keys as their families declare them
    # the trials evaluated first are code, not config: a release that changes a family's first
    # point changes what the experiment holds, so it is part of the key (a resumed search with
    # other first points would mix two searches)
    settings["first_points"] = first_points(cfg) if cfg.seed_each_family else None
    embeddings = {}
    read = {b for spec in cfg.features for b in parse_features(spec)[0]}
    for fam in cfg.families:  # and the activation maps an activations family trains on
        if get_family(fam).input == ACTIVATIONS:
            read.update(b for key in get_family(fam).input_key(cfg)
                        for b in parse_features(key, maps=True)[0])
    for name in sorted(read):
        path = storage.join(backbone_dir(cfg.out, name), FILE)
        if name in (extracting or {}):
            embeddings[name] = extracting[name]
            continue
        embeddings[name] = read_fingerprint(path).get("key") if storage.is_file(path) else None
    inputs = {"manifest": frame_hash(read_manifest(manifest_path)), "embeddings": embeddings}
    packages = dict.fromkeys([*SEARCH_PACKAGES,
                              *(p for fam in cfg.families for p in get_family(fam).packages)])
    return make("search", settings, inputs, packages)


def trial_requests(cfg: SearchConfig, cluster_has_gpus: bool
                   ) -> list[tuple[str, dict[str, float], str]]:
    """Each searched family's resources per trial (``FamilySpec.resources``), with the settings
    that ask for them and how to change them (for ``raysession.check_resources``)."""
    requests = []
    for fam in cfg.families:
        spec = get_family(fam)
        resources = spec.resources(cfg, cluster_has_gpus)
        resource_settings = [s for s in spec.settings if "gpu" in s.key or "memory" in s.key]
        asked = [f"search.cpus_per_trial: {cfg.cpus_per_trial:g}",
                 *(f"search.{s.key}: {s.read(cfg)}" for s in resource_settings)]
        keys = ["search.cpus_per_trial", *(f"search.{s.key}" for s in resource_settings)]
        fix = (f"Lower {' or '.join(keys)} to what a node has, or leave '{fam}' out of "
               "search.families.")
        requests.append((f"A trial of family '{fam}' ({', '.join(asked)})",
                         {k: float(v) for k, v in resources.items()}, fix))
    return requests


def check_trial_resources(cfg: SearchConfig) -> None:
    import ray

    check_resources(trial_requests(cfg, bool(ray.cluster_resources().get("GPU", 0))))


def experiment_path(cfg: SearchConfig) -> str:
    return storage.join(storage_path(cfg), cfg.experiment)


def check_search_claim(cfg: SearchConfig, manifest_path: str, extracting: dict[str, str],
                       fresh: bool = False) -> None:
    """Refuse now what ``run_search`` would refuse once the extraction has run (``extracting``:
    the fingerprint keys it will write): nothing is written or deleted."""
    check_claim(experiment_path(cfg), "search", search_fingerprint(cfg, manifest_path, extracting),
                fresh, root=storage_path(cfg))


def run_search(cfg: SearchConfig, manifest_path: str, resume: bool = True, fresh: bool = False):
    """Run (or resume) the experiment; returns the ResultGrid.

    The experiment folder is claimed by this search's fingerprint: a rerun with other settings
    or inputs is refused (``fresh``: the old experiment is deleted and the search starts over),
    never "resumed" into the old winner."""

    # the fingerprint first: changed settings are refused before Ray starts (30 s) or the data
    # loads
    claim(experiment_path(cfg), "search", search_fingerprint(cfg, manifest_path), fresh,
          root=storage_path(cfg))
    ensure_ray()
    check_trial_resources(cfg)  # a trial no node can ever hold: refused, not queued forever
    data = load_search_data(cfg, manifest_path)
    tuner = build_tuner(cfg, data, resume=resume)
    try:
        return tuner.fit()
    except RuntimeError as exc:
        # Ray's memory monitor killed a trial's actor before it ran: Tune gives up the whole
        # experiment with a RuntimeError. What finished is kept; a rerun resumes it.
        if "low on memory" not in str(exc) and "OutOfMemoryError" not in str(exc):
            raise
        raise DermrayError(
            "The search stopped: Ray killed a trial because this machine ran low on memory "
            f"({str(exc).splitlines()[0][:200]}). Finished trials are kept, and rerunning the same "
            "command resumes the search. To need less memory: lower search.max_concurrent, or "
            "search fewer inputs at once (one search.cached_cnn_meta option holds the activation "
            "maps once, two hold them twice).") from None

