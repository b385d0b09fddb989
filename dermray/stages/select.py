"""After the search: trials.csv, the winner by validation accuracy (ties: balanced accuracy, then
log-loss, then the parameters' text, so that a resumed search picks the same trial),
test metrics computed once for the winner and the best trial of each family, the exported model
bundle, metrics.json, report.md and the confusion-matrix PNG."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermray.config import SearchConfig, config_to_dict
from dermray.data.catalog import read_manifest
from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.backbones import weights_origin
from dermray.models.bundle import BUNDLE_FILE, BackboneRecord, BundleSpec
from dermray.models.features import parse_features
from dermray.models.heads import IMAGES, get_family, param_prefixes
from dermray.models.policies import fit_operating_points, policy_report
from dermray.report.dashboard import write_dashboard
from dermray.report.evaluate import metrics, model_card, plot_confusion, write_report
from dermray.report.trials import ENDED, iso_time, trial_state
from dermray.stages.search import REPORTED, head_inputs, head_params, load_search_data
from dermray.stages.tracking import log_winner_bundle

logger = logging.getLogger(__name__)


def trials_frame(results, cfg: SearchConfig) -> pd.DataFrame:
    """One row per trial: id, family, features, parameters, val metrics, status, iterations."""
    rows = []
    prefixes = param_prefixes()  # of every registered family, a test's own included
    for result in results:
        config = dict(result.config or {})
        metrics = result.metrics or {}
        family = config.get("family", "")
        params = {k: v for k, v in config.items() if k.startswith(prefixes)}
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "family": family,
            "features": get_family(family).features_of(config) if family else "",
            "params": json.dumps(params, sort_keys=True),
            **{k: metrics.get(k, np.nan) for k in REPORTED},
            "iterations": metrics.get("training_iteration", 0),
            "time_total_s": metrics.get("time_total_s", np.nan),
            "ended_at": iso_time(metrics.get("timestamp")),
            "completed": bool(metrics.get("final", False)),
            "status": trial_state("ERROR" if result.error else "TERMINATED",
                                  bool(metrics.get("final", False))),
            "path": result.path,
        })
    return rank(pd.DataFrame(rows))


# the winner's order: val accuracy, then val balanced accuracy, then val log-loss; last the
# family, features and parameters' text, which do not depend on the order trials ended in or
# on their ids (a tie on small or separable data must not pick another trial on a rerun)
ORDER = (("val_accuracy", False), ("val_balanced_accuracy", False), ("val_log_loss", True),
         ("family", True), ("features", True), ("params", True))


def rank(trials: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c, _ in ORDER]
    return trials.sort_values(cols, ascending=[a for _, a in ORDER], na_position="last",
                              kind="mergesort").reset_index(drop=True)


def pick(trials: pd.DataFrame) -> pd.Series:
    """The winner: highest val accuracy; ties broken as ``ORDER`` says."""
    ok = trials[trials["status"].isin(ENDED) & trials["val_accuracy"].notna()]
    if ok.empty:
        raise DermrayError("No trial finished with a val_accuracy; see the Tune logs under "
                           "OUT/tune for the errors.")
    return rank(ok).iloc[0]


def _fitted_head(row: pd.Series, results, cfg: SearchConfig, data: dict[str, Any]):
    """The trial's checkpointed head; refit from its config if ASHA stopped it first."""
    head_class = get_family(row["family"]).head_class
    result = next(r for r in results if r.path == row["path"])
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            return head_class.load(Path(directory))
    logger.info("the best %s trial (%s on %s) was stopped before its final report, so it has "
                "no checkpoint: refitting it from its parameters to score it", row["family"],
                row["trial_id"], row["features"])
    X_tr, y_tr, X_va, y_va = data[row["features"]]
    head = head_class(**head_params(result.config, cfg))
    return head.fit(X_tr, y_tr, eval_set=(X_va, y_va))


def score(head, family: str, features: str, cfg: SearchConfig, manifest_path: str,
          split: str) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray]:
    """Metrics of a fitted head on one split, with the rows and probabilities."""

    X, y, frame = head_inputs(get_family(family), cfg, features, split, manifest_path)
    proba = head.predict_proba(X)
    return metrics(y, proba), frame, proba


def bundle_spec(row: pd.Series, cfg: SearchConfig, extract_record: dict[str, Any],
                metrics: dict[str, Any], operating_points: dict[str, Any] | None = None
                ) -> BundleSpec:
    """What the winner is: its family, features, parameters and figures; for an embedding family
    the backbones as extracted (weights by content, never by a path of this machine; the
    registry's preprocessing) and the extraction's image size, views and seed."""
    family = get_family(row["family"])
    ext = extract_record.get("config", {})
    if family.input == IMAGES:
        backbones: list[BackboneRecord] = []
        image_size = family.image_size(cfg)
    else:
        names, _ = parse_features(row["features"], maps=True)
        missing = [n for n in names if n not in extract_record.get("weights", {})]
        if missing or "image_size" not in ext:
            raise DermrayError(f"{storage.display(storage.join(cfg.out, 'extract_run.json'))} "
                               f"does not record the extraction of {', '.join(missing or names)}"
                               ": run `dermray extract` again before exporting.")
        backbones = [backbone_record(n, extract_record) for n in names]
        image_size = ext["image_size"]
    return BundleSpec(family=row["family"], features=row["features"],
                      params=json.loads(row["params"]), trial_id=row["trial_id"],
                      backbones=tuple(backbones), image_size=image_size,
                      tta_views=ext.get("tta_views", 0), seed=ext.get("seed", 0),
                      metrics=metrics, operating_points=operating_points)


def backbone_record(name: str, extract_record: dict[str, Any]) -> BackboneRecord:
    """A backbone as the extraction read it: its weights' identity, file name, the path they
    were read at (a hint) and their origin (an older record without these: none, and the origin
    from the identity)."""
    identity = extract_record["weights"][name]
    hint = extract_record.get("weights_hints", {}).get(name, "")
    origin = (extract_record.get("weights_origins", {}).get(name)
              or weights_origin(name, identity, hint))
    return BackboneRecord.of(name, identity, extract_record.get("weights_names", {}).get(name, ""),
                             hint, origin)


def export_bundle(head, row: pd.Series, cfg: SearchConfig, extract_record: dict[str, Any],
                  metrics: dict[str, Any], out: str,
                  operating_points: dict[str, Any] | None = None) -> str:
    """OUT/model: the head (in a format that runs no code on load), model_card.md, and last
    bundle.json (``BundleSpec.write``: the spec and the sha256 of the other files)."""
    spec = bundle_spec(row, cfg, extract_record, metrics, operating_points)
    target = storage.join(out, "model")
    # built beside its target (a local OUT: one rename puts it in place) or in a temp folder
    parent = Path(out) if not storage.is_remote(out) else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.build.", dir=parent))
    try:
        head.save(tmp / "head")
        (tmp / "model_card.md").write_text(model_card(spec, extract_record))
        spec.write(tmp)
        # locally OUT/model is a link swapped atomically: a reader never finds no model
        return storage.replace_dir(tmp, target, marker=BUNDLE_FILE, link=True, root=out)
    finally:  # gone already when it was renamed into place
        storage.remove(tmp, parent or tempfile.gettempdir(), "the build folder", logging.DEBUG,
                       best_effort=True)


def operating_points(scored: dict[str, tuple[np.ndarray, np.ndarray]], cfg: SearchConfig,
                     manifest_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The winner's temperature and every registered policy, fitted on validation only, and
    each policy's metrics on val and test (the prior: the training split's class shares)."""

    train = read_manifest(manifest_path).query("split == 'train'")
    prior = train["dx"].value_counts().reindex(list(CLASSES), fill_value=0).to_numpy(float)
    val_proba, y_val = scored["val"]
    points = fit_operating_points(val_proba, y_val, prior, config_to_dict(cfg))
    return points, {split: policy_report(proba, y, points) for split, (proba, y) in scored.items()}


def finish(results, cfg: SearchConfig, manifest_path: str, out: str) -> dict[str, Any]:
    """Write trials.csv, score the winner and each family's best on val and test, export.

    ``out`` is a folder or an ``s3://`` URI."""

    trials = trials_frame(results, cfg)
    storage.write_text(storage.join(out, "trials.csv"),
                       trials.drop(columns=["path"]).to_csv(index=False))
    winner = pick(trials)
    data = load_search_data(cfg, manifest_path) if not all(
        bool(c) for c in trials["completed"]) else {}
    best_per_family: dict[str, Any] = {}
    winner_entry: dict[str, Any] = {}
    winner_head = None
    for family in trials["family"].unique():
        row = pick(trials[trials["family"] == family])
        head = _fitted_head(row, results, cfg, data)
        val, val_rows, val_proba = score(head, family, row["features"], cfg, manifest_path,
                                         "val")
        test, test_rows, test_proba = score(head, family, row["features"], cfg, manifest_path,
                                            "test")
        entry = {"trial_id": row["trial_id"], "family": family, "features": row["features"],
                 "params": json.loads(row["params"]), "val": val, "test": test}
        best_per_family[family] = entry
        if row["trial_id"] == winner["trial_id"]:
            winner_entry, winner_head = entry, head
            scored = {"val": (val_proba, val_rows["label"].to_numpy()),
                      "test": (test_proba, test_rows["label"].to_numpy())}
    points, policy_metrics = operating_points(scored, cfg, manifest_path)
    extract_path = storage.join(cfg.out, "extract_run.json")
    extract_record = json.loads(storage.read_text(extract_path)) if storage.is_file(
        extract_path) else {}
    summary = {"n_trials": len(trials), "winner": winner_entry,
               "best_per_family": best_per_family}
    metrics_json = {k: winner_entry[k] for k in ("family", "features", "params", "val", "test",
                                                 "trial_id")}
    summary["policies"], summary["operating_points"] = policy_metrics, points
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(
        {**metrics_json, "operating_points": points, "policies": policy_metrics,
         "best_per_family": best_per_family}, indent=2))
    export_bundle(winner_head, winner, cfg, extract_record,
                  {"val": winner_entry["val"], "test": winner_entry["test"],
                   "policies": policy_metrics}, out, operating_points=points)
    log_winner_bundle(cfg, winner["trial_id"], storage.join(out, "model"),  # MLflow, if set
                      {**metrics_json, "operating_points": points, "policies": policy_metrics})
    storage.write_bytes(storage.join(out, "confusion_matrix.png"), plot_confusion(
        winner_entry["test"]["confusion_matrix"],
        f"{winner_entry['family']} on {winner_entry['features']} (test)"))
    write_report(out, summary)
    write_dashboard(out)
    return summary
