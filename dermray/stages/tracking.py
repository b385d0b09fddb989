"""Optional MLflow tracking of a search (``search.mlflow_tracking_uri``), through Ray Tune's own
``MLflowLoggerCallback``: one MLflow run per trial with its parameters (the trial's config) and
its metrics per reported iteration; after export, the winner's bundle is logged as an artifact
of the winning trial's run (``log_winner_bundle``), which is tagged ``dermray.winner``.

URIs: an MLflow server (``http(s)://...``), or a local file store (``file:///abs/path``; MLflow 3
keeps that backend in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set here for
``file:`` URIs only, in the driver, where Tune's callbacks run).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dermray.installed import require
from dermray.io import storage
from dermray.io.storage import download_dir

logger = logging.getLogger(__name__)

WINNER_TAG = "dermray.winner"


def experiment_name(cfg: Any) -> str:
    """The MLflow experiment of a search: ``dermray-<search.experiment>``."""
    return f"dermray-{cfg.experiment}"


def _prepare(uri: str) -> None:
    require("mlflow", "search.mlflow_tracking_uri is set")
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def mlflow_callback(cfg: Any):
    """Tune's MLflow logger for this search (parameters at trial start, metrics per result)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    _prepare(cfg.mlflow_tracking_uri)
    return MLflowLoggerCallback(tracking_uri=cfg.mlflow_tracking_uri,
                                experiment_name=experiment_name(cfg),
                                tags={"dermray.out": storage.display(cfg.out)},
                                save_artifact=False)


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


def log_winner_bundle(cfg: Any, trial_id: str, bundle: str) -> str | None:
    """Log the exported bundle (``OUT/model``, a folder or an s3:// URI) as the ``model``
    artifact of the winning trial's run, and tag that run; returns the run id (None: tracking
    is off, or the tracking server failed: the search's results are in OUT all the same, so
    that is a warning, not an error)."""
    uri = getattr(cfg, "mlflow_tracking_uri", "")
    if not uri:
        return None
    _prepare(uri)
    try:
        return _log_bundle(uri, cfg, trial_id, bundle)
    except Exception as exc:  # noqa: BLE001 - a tracking server down must not lose OUT
        logger.warning("could not log the winner's bundle to MLflow at %s: %s", uri, exc)
        return None


def _log_bundle(uri: str, cfg: Any, trial_id: str, bundle: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = winner_run(client, cfg, str(trial_id))
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow uploads from local files
        local = download_dir(bundle, tmp) if storage.is_remote(bundle) else Path(bundle)
        client.log_artifacts(run_id, str(local), artifact_path="model")
    client.set_tag(run_id, WINNER_TAG, "true")
    logger.info("logged the winner's bundle to MLflow run %s (%s)", run_id, uri)
    return run_id
