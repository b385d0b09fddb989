"""A search's tracking: TensorBoard's HParams setup (``HParamsLogger``: every family's
parameters), and optional MLflow tracking (``search.mlflow_tracking_uri``), through Ray Tune's own
``MLflowLoggerCallback``: one MLflow run per trial with its parameters (the trial's config) and
its metrics per reported iteration; after export, the winner's bundle is logged to the winning
trial's run as an MLflow pyfunc model (``runs:/<run>/model``, see dermray.models.mlflow_model),
with its test and per-policy metrics (``log_winner_bundle``), and that run is tagged
``dermray.winner``.

URIs: an MLflow server (``http(s)://...``), or a local file store (``file:///abs/path``; MLflow 3
keeps that backend in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set here for
``file:`` URIs only, in the driver, where Tune's callbacks run).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dermray.installed import is_installed, require
from dermray.io import storage
from dermray.io.storage import download_dir
from dermray.models.heads import get_family
from dermray.models.mlflow_model import save_pyfunc

logger = logging.getLogger(__name__)

WINNER_TAG = "dermray.winner"
MODEL_PATH = "model"  # the winner's MLflow model: runs:/<run>/model


def experiment_name(cfg: Any) -> str:
    """The MLflow experiment of a search: ``dermray-<search.experiment>``."""
    return f"dermray-{cfg.experiment}"


def _prepare(uri: str) -> None:
    require("mlflow", "search.mlflow_tracking_uri is set")
    # MLflow's own tqdm bars (artifact up- and downloads) would write over the terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


# what a trial run's metrics are: dermray's own figures (val_*, train_*); Tune's bookkeeping
# in the same result (pid, timestamp, time_this_iter_s, config/..., ...) is not a metric
OWN_METRICS = ("val_", "train_")


def own_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric dermray figures of a Tune result, without Ray's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k.startswith(OWN_METRICS) and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def mlflow_callback(cfg: Any):
    """Tune's MLflow logger for this search (parameters at trial start, metrics per result,
    stepped by the trial's iteration), logging dermray's figures only."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class OwnMetricsCallback(MLflowLoggerCallback):
        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            step = int(result.get("training_iteration") or iteration)
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial],
                                         metrics_to_log=own_metrics(result), step=step)

    _prepare(cfg.mlflow_tracking_uri)
    return OwnMetricsCallback(tracking_uri=cfg.mlflow_tracking_uri,
                              experiment_name=experiment_name(cfg),
                              tags={"dermray.out": storage.display(cfg.out)},
                              save_artifact=False)


# ---- TensorBoard: one HParams setup for every family ----------------------------------------

def hparam_domain(cfg: Any) -> dict[str, Any]:
    """Every parameter a trial of the search can have, with a value of its type: the family,
    the features and each searched family's parameters (its first point names them all)."""
    domain: dict[str, Any] = {"family": "", "features": ""}
    for family in cfg.families:
        domain.update(get_family(family).first_point(cfg))
    return domain


def _tbx_logger_base() -> type:
    from ray.tune.logger import TBXLoggerCallback

    return TBXLoggerCallback


NOT_APPLICABLE = "n/a"  # the text of a parameter a trial does not have (another family's)


def neutral(value: Any) -> Any:
    """The value a trial shows for a parameter it does not have, of that parameter's type:
    'n/a', False or 0 (TensorBoard's parallel coordinates drop a session with any blank)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return type(value)(0)
    return NOT_APPLICABLE


class HParamsLogger(_tbx_logger_base()):
    """Tune's TensorBoard logger (scalars per result, as before) whose HParams setup covers
    every family's parameters.

    Tune's own logger writes, with each trial, an experiment made of that trial's parameters, and
    TensorBoard shows the first experiment it finds: one family's parameters only. Here every
    trial writes the same experiment (``hparam_domain``: all searched families' parameters, with
    their types), and values for all of them: its own, and a neutral value (``neutral``: 'n/a',
    0, False) for another family's, so that TensorBoard's table and plots show every trial (its
    parallel coordinates leave out a trial with any blank); the ``family`` column says which
    parameters apply.
    """

    def __init__(self, domain: dict[str, Any]) -> None:
        super().__init__()
        self.domain = dict(domain)

    def trial_hparams(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's own parameters over the neutral values of the whole domain."""
        own = {}
        for key, value in (params or {}).items():
            value = value.item() if hasattr(value, "item") else value  # numpy scalars
            if isinstance(value, (str, bool, int, float)):
                own[key] = value
        return {**{k: neutral(v) for k, v in self.domain.items()}, **own}

    def _try_log_hparams(self, trial: Any, result: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams

        try:
            summaries = hparams(self.trial_hparams(trial.evaluated_params), result)
        except Exception:  # as Tune's own logger: a bad value loses the HParams only
            logger.warning("could not log the hyperparameters of trial %s to TensorBoard",
                           trial, exc_info=True)
            return
        writer = self._trial_writer[trial].file_writer
        for summary in summaries:  # the experiment, the session's start and end
            writer.add_summary(summary)


def hparams_logger(cfg: Any) -> list[Any]:
    """[the TensorBoard logger of a search] (empty without tensorboardX: Tune then warns)."""
    return [HParamsLogger(hparam_domain(cfg))] if is_installed("tensorboardX") else []


def winner_metrics(result: dict[str, Any]) -> dict[str, float]:
    """metrics.json's figures as flat MLflow metrics: ``val_*`` and ``test_*`` of the winner,
    and ``<split>_<policy>_<metric>`` for every operating point (recall per class included)."""
    flat: dict[str, float] = {}
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece"):
            value = (result.get(split) or {}).get(key)
            if isinstance(value, (int, float)):
                flat[f"{split}_{key}"] = float(value)
        scored = (result.get("policies") or {}).get(split) or {}
        for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
            if isinstance(scored.get(key), (int, float)):
                flat[f"{split}_{key}"] = float(scored[key])
        for policy, figures in (scored.get("policies") or {}).items():
            for key, value in figures.items():
                if isinstance(value, (int, float)):
                    flat[f"{split}_{policy}_{key}"] = float(value)
                elif isinstance(value, dict):  # recall per class
                    flat.update({f"{split}_{policy}_{key}_{c}": float(v)
                                 for c, v in value.items() if isinstance(v, (int, float))})
    return flat


def winner_run(client: Any, cfg: Any, trial_id: str) -> str:
    """The MLflow run of the winning trial (Tune names it ``<trainable>_<trial_id>``); a run of
    its own when the trial was not tracked (a search resumed from before tracking was set)."""
    exp = client.get_experiment_by_name(experiment_name(cfg))
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name(cfg))
    runs = client.search_runs([exp_id], filter_string=f"tags.trial_name LIKE '%_{trial_id}'",
                              max_results=1)
    if runs:
        return runs[0].info.run_id
    logger.warning("no MLflow run of trial %s: logging the winner's bundle to a run of its own",
                   trial_id)
    return client.create_run(exp_id, tags={"trial_name": f"winner_{trial_id}"},
                             run_name=f"winner_{trial_id}").info.run_id


def log_winner_bundle(cfg: Any, trial_id: str, bundle: str,
                      result: dict[str, Any] | None = None) -> str | None:
    """Log the exported bundle (``OUT/model``, a folder or an s3:// URI) to the winning trial's
    run as the MLflow pyfunc model ``model`` (the bundle inside it, as its artifact ``bundle``:
    ``model/artifacts/bundle``), with the winner's val and test metrics and every
    operating point (``result``: metrics.json's content; its operating points also as the
    ``operating_points.json`` artifact), and tag that run; returns the run id (None: tracking
    is off, or the tracking server failed: the search's results are in OUT all the same, so
    that is a warning, not an error)."""
    uri = getattr(cfg, "mlflow_tracking_uri", "")
    if not uri:
        return None
    _prepare(uri)
    try:
        return _log_bundle(uri, cfg, trial_id, bundle, result or {})
    except Exception as exc:  # noqa: BLE001 - a tracking server down must not lose OUT
        logger.warning("could not log the winner's bundle to MLflow at %s: %s", uri, exc)
        return None


def _log_bundle(uri: str, cfg: Any, trial_id: str, bundle: str, result: dict[str, Any]) -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = winner_run(client, cfg, str(trial_id))
    if result:
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0)
                                          for k, v in sorted(winner_metrics(result).items())])
    client.set_tag(run_id, WINNER_TAG, "true")
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow uploads from local files
        local = download_dir(bundle, Path(tmp, "bundle")) if storage.is_remote(bundle) else Path(
            bundle)
        if result.get("operating_points"):
            points = Path(tmp) / "operating_points.json"
            points.write_text(json.dumps(result["operating_points"], indent=2))
            client.log_artifact(run_id, str(points))
        # an MLflow model (MLmodel, code, environment) with the bundle as its artifact, so that
        # mlflow.pyfunc.load_model("runs:/<run>/model") predicts as `dermray predict` does
        model = save_pyfunc(local, Path(tmp) / "model")
        client.log_artifacts(run_id, str(model), artifact_path=MODEL_PATH)
    logger.info("logged the winner's model to MLflow run %s (%s): load it with "
                "mlflow.pyfunc.load_model('runs:/%s/%s')", run_id, uri, run_id, MODEL_PATH)
    return run_id
