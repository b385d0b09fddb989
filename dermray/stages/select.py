"""After the search: trials.csv, the winner by validation accuracy (ties: balanced accuracy, then
log-loss, then the parameters' text, so that a resumed search picks the same trial),
test metrics computed once for the winner and the best trial of each family, the exported model
bundle, metrics.json, report.md and the confusion-matrix PNG.

**The ensemble candidate** (``search.ensemble``, on by default): the best finished trial of each
(family, backbones) pair, families on embeddings or activation maps only (an images family
decodes at its own size; metadata does not make a pair of its own: ``resnet50_ms`` and
``resnet50_ms+meta`` are one backbone, the better trial counts), soft-voted with weights on the
simplex fitted to validation log-loss (``dermray.models.ensemble``). Its validation accuracy is
estimated out of fold: 5 lesion-grouped folds of validation, weights fitted on 4 and applied to
the 5th. It is the winner only if that out-of-fold accuracy beats the best trial's validation
accuracy (strictly); then its final weights are fitted on all of validation, and so are its
temperature and operating points, on the ensemble's validation probabilities. Either way the
candidate (members, weights, out-of-fold and test figures, and why it won or lost) is in
metrics.json's ``ensemble``, the summary and report.md."""

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
from dermray.io.outputs import read_json_output
from dermray.models.backbones import weights_origin
from dermray.models.bundle import (
    BUNDLE_FILE,
    BackboneRecord,
    BundleSpec,
    MemberRecord,
    ensemble_backbones,
    ensemble_features,
)
from dermray.models.ensemble import ENSEMBLE, FOLDS, EnsembleHead, fit_weights, mix, out_of_fold
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


class LazySearchData:
    """The search's training data, read on first use (an activation map family's is the
    biggest thing selection could read, and a checkpointed trial does not need it)."""

    def __init__(self, cfg: SearchConfig, manifest_path: str) -> None:
        self.cfg, self.manifest_path, self._data = cfg, manifest_path, None

    def __getitem__(self, features: str):
        if self._data is None:
            self._data = load_search_data(self.cfg, self.manifest_path)
        return self._data[features]


def _fitted_head(row: pd.Series, results, cfg: SearchConfig, data: Any):
    """The trial's head from its newest checkpoint: its final model, or, for a trial ASHA
    stopped first, the best iteration it had reported (the Keras heads checkpoint each new
    best epoch); refit from its config where a trial has none (XGBoost, stopped early)."""
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


def ensemble_spec(members: list[MemberRecord], extract_record: dict[str, Any],
                  metrics: dict[str, Any], operating_points: dict[str, Any] | None,
                  out: str) -> BundleSpec:
    """An ensemble bundle's spec: its members, and every backbone they read, as extracted."""
    ext = extract_record.get("config", {})
    names = ensemble_backbones(members)
    missing = [n for n in names if n not in extract_record.get("weights", {})]
    if missing or "image_size" not in ext:
        raise DermrayError(f"{storage.display(storage.join(out, 'extract_run.json'))} does not "
                           f"record the extraction of {', '.join(missing or names)}: run "
                           "`dermray extract` again before exporting.")
    return BundleSpec(family=ENSEMBLE, features=ensemble_features(members), params={},
                      trial_id=ENSEMBLE, backbones=tuple(backbone_record(n, extract_record)
                                                         for n in names),
                      image_size=ext["image_size"], tta_views=ext.get("tta_views", 0),
                      seed=ext.get("seed", 0), metrics=metrics,
                      operating_points=operating_points, members=tuple(members))


def export_bundle(head, row: pd.Series | None, cfg: SearchConfig, extract_record: dict[str, Any],
                  metrics: dict[str, Any], out: str,
                  operating_points: dict[str, Any] | None = None,
                  spec: BundleSpec | None = None) -> str:
    """OUT/model: the head (in a format that runs no code on load; an ensemble's members under
    head/<i>/), model_card.md, and last bundle.json (``BundleSpec.write``: the spec and the
    sha256 of the other files, the members' included). ``spec``: an ensemble's, else the
    trial ``row``'s."""
    spec = spec or bundle_spec(row, cfg, extract_record, metrics, operating_points)
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


def ensemble_members(trials: pd.DataFrame) -> list[pd.Series]:
    """The ensemble's members: the best finished trial (``pick``) of each (family, backbones)
    pair, families on embeddings or activation maps only (see the module docstring)."""
    ok = trials[trials["status"].isin(ENDED) & trials["val_accuracy"].notna()]
    ok = ok[[get_family(f).input != IMAGES for f in ok["family"]]]
    if ok.empty:
        return []
    keys = ["+".join(parse_features(f, maps=True)[0]) for f in ok["features"]]
    ok = ok.assign(_backbones=keys)
    best = [pick(group) for _, group in ok.groupby(["family", "_backbones"], sort=True)]
    return [row.drop("_backbones") for row in best]


def _aligned(rows: pd.DataFrame, proba: np.ndarray, order: pd.Index) -> np.ndarray:
    """A member's probabilities in the row order of ``order`` (image ids)."""
    position = pd.Series(np.arange(len(rows)), index=rows["image_id"].astype(str).to_numpy())
    return proba[position.loc[order].to_numpy()]


def ensemble_candidate(members: list[tuple[pd.Series, dict[str, Any]]], best_val: float,
                       lesions: pd.Series, seed: int = 0
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The soft vote of ``members`` ((row, scored) pairs; ``scored``: each split's rows and
    probabilities): its record for metrics.json, and its validation and test (probabilities,
    labels) with the final weights (empty where there is no candidate).

    ``best_val``: the best single trial's val accuracy, the number to beat; ``lesions``: the
    lesion_id of each image_id (the folds' groups); ``seed``: the folds' shuffle."""
    record: dict[str, Any] = {
        "rule": ("best finished trial of each (family, backbones) pair (embedding and "
                 "activation-map families); weights on the simplex minimising validation "
                 f"log-loss; validation accuracy out of fold ({FOLDS} lesion-grouped folds: "
                 "weights fitted on the others, applied to the held-out fold); chosen only if "
                 "that beats the best trial's validation accuracy"),
        "members": [{"trial_id": row["trial_id"], "family": row["family"],
                     "features": row["features"], "val_accuracy": float(row["val_accuracy"])}
                    for row, _ in members],
        "best_trial_val_accuracy": float(best_val), "chosen": False}
    if len(members) < 2:
        record["reason"] = (f"{len(members)} (family, backbones) pair(s) finished: an ensemble "
                            "needs 2 or more")
        return record, {}
    out: dict[str, Any] = {}  # split -> (members' probabilities, labels, image ids)
    for split in ("val", "test"):
        frames = [scored[split][0] for _, scored in members]
        ids = [pd.Index(f["image_id"].astype(str)) for f in frames]
        if any(set(i) != set(ids[0]) or len(i) != len(ids[0]) for i in ids[1:]):
            record["reason"] = (f"the members score different {split} images (their inputs "
                                "were extracted from different rows): no ensemble")
            return record, {}
        order = ids[0]
        probas = [_aligned(scored[split][0], scored[split][1], order) for _, scored in members]
        y = frames[0]["label"].to_numpy()
        out[split] = (probas, y, order)
    val_probas, y_val, val_ids = out["val"]
    groups = lesions.reindex(val_ids).fillna(pd.Series(val_ids, index=val_ids))
    oof = out_of_fold(val_probas, y_val, groups.to_numpy(), FOLDS, seed)
    weights = fit_weights(val_probas, y_val)
    val_proba, test_proba = mix(val_probas, weights), mix(out["test"][0], weights)
    record.update({
        "weights": [float(w) for w in weights],
        "out_of_fold": {"accuracy": oof.accuracy, "log_loss": oof.log_loss,
                        "folds": len(oof.folds),
                        "fold_weights": [[float(w) for w in fw] for fw in oof.fold_weights]},
        # val: with the final weights, fitted on all of validation (in-sample: not the number
        # it is chosen by); test: scored once, as every best trial's is
        "val": metrics(y_val, val_proba), "test": metrics(out["test"][1], test_proba)})
    for member, w in zip(record["members"], weights, strict=True):
        member["weight"] = float(w)
    record["chosen"] = oof.accuracy > best_val
    record["reason"] = (f"out-of-fold validation accuracy {oof.accuracy:.4f} "
                        f"{'beats' if record['chosen'] else 'does not beat'} the best trial's "
                        f"{best_val:.4f}")
    return record, {"val": (val_proba, y_val), "test": (test_proba, out["test"][1])}


def choose_ensemble(trials: pd.DataFrame, scored: Any, lesions: pd.Series, seed: int = 0
                    ) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
    """The ensemble candidate's record, and where it wins: its head (``EnsembleHead``), its
    winner entry (as a trial's in metrics.json), its val and test (probabilities, labels) and
    its member records. ``scored(row)``: a trial's head and each split's (rows, probabilities,
    metrics)."""
    rows = ensemble_members(trials)
    record, mixed = ensemble_candidate(
        [(r, {k: scored(r)[k][:2] for k in ("val", "test")}) for r in rows],
        float(pick(trials)["val_accuracy"]), lesions, seed)
    logger.info("ensemble candidate: %s", record["reason"])
    if not record["chosen"]:
        return record, None
    members = [MemberRecord(family=r["family"], features=r["features"],
                            params=json.loads(r["params"]), trial_id=r["trial_id"], weight=w)
               for r, w in zip(rows, record["weights"], strict=True)]
    head = EnsembleHead([scored(r)["head"] for r in rows], record["weights"],
                        [r["family"] for r in rows])
    entry = {"trial_id": ENSEMBLE, "family": ENSEMBLE, "features": ensemble_features(members),
             "params": {"weights": {m.trial_id: m.weight for m in members}},
             "val": record["val"], "test": record["test"],
             "val_out_of_fold_accuracy": record["out_of_fold"]["accuracy"]}
    return record, (head, entry, mixed, members)


def finish(results, cfg: SearchConfig, manifest_path: str, out: str) -> dict[str, Any]:
    """Write trials.csv, score the winner and each family's best on val and test, build the
    ensemble candidate (``search.ensemble``), export the winner.

    ``out`` is a folder or an ``s3://`` URI."""

    trials = trials_frame(results, cfg)
    storage.write_text(storage.join(out, "trials.csv"),
                       trials.drop(columns=["path"]).to_csv(index=False))
    winner = pick(trials)
    data = LazySearchData(cfg, manifest_path)  # read only if a trial must be refitted
    cache: dict[str, dict[str, Any]] = {}

    def scored(row: pd.Series) -> dict[str, Any]:
        """A trial's fitted head and its metrics, rows and probabilities on val and test."""
        if row["trial_id"] not in cache:
            head = _fitted_head(row, results, cfg, data)
            entry: dict[str, Any] = {"head": head}
            for split in ("val", "test"):
                figures, rows, proba = score(head, row["family"], row["features"], cfg,
                                             manifest_path, split)
                entry[split] = (rows, proba, figures)
            cache[row["trial_id"]] = entry
        return cache[row["trial_id"]]

    best_per_family: dict[str, Any] = {}
    for family in trials["family"].unique():
        row = pick(trials[trials["family"] == family])
        s = scored(row)
        best_per_family[family] = {"trial_id": row["trial_id"], "family": family,
                                   "features": row["features"],
                                   "params": json.loads(row["params"]),
                                   "val": s["val"][2], "test": s["test"][2]}
    won = scored(winner)
    winner_entry = {"trial_id": winner["trial_id"], "family": winner["family"],
                    "features": winner["features"], "params": json.loads(winner["params"]),
                    "val": won["val"][2], "test": won["test"][2]}
    winner_head = won["head"]
    scores = {split: (won[split][1], won[split][0]["label"].to_numpy())
              for split in ("val", "test")}
    ensemble, member_records = None, None
    if cfg.ensemble:
        manifest = read_manifest(manifest_path).drop_duplicates("image_id")
        lesions = manifest.set_index(manifest["image_id"].astype(str))["lesion_id"]
        ensemble, chosen = choose_ensemble(trials, scored, lesions, cfg.seed)
        if chosen is not None:
            winner_head, winner_entry, scores, member_records = chosen
    points, policy_metrics = operating_points(scores, cfg, manifest_path)
    extract_path = storage.join(cfg.out, "extract_run.json")
    extract_record = read_json_output(
        extract_path, "redo the extraction (`dermray extract --fresh`)", dict) if storage.is_file(
        extract_path) else {}
    summary = {"n_trials": len(trials), "winner": winner_entry,
               "best_per_family": best_per_family}
    if ensemble is not None:
        summary["ensemble"] = ensemble
    metrics_json = {k: winner_entry[k] for k in ("family", "features", "params", "val", "test",
                                                 "trial_id")}
    summary["policies"], summary["operating_points"] = policy_metrics, points
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(
        {**metrics_json, "operating_points": points, "policies": policy_metrics,
         "best_per_family": best_per_family,
         **({"ensemble": ensemble} if ensemble is not None else {})}, indent=2))
    bundle_metrics = {"val": winner_entry["val"], "test": winner_entry["test"],
                      "policies": policy_metrics}
    spec = (ensemble_spec(member_records, extract_record, bundle_metrics, points, cfg.out)
            if member_records else None)
    export_bundle(winner_head, winner, cfg, extract_record, bundle_metrics, out,
                  operating_points=points, spec=spec)
    log_winner_bundle(cfg, winner_entry["trial_id"], storage.join(out, "model"),  # MLflow
                      {**metrics_json, "operating_points": points, "policies": policy_metrics})
    storage.write_bytes(storage.join(out, "confusion_matrix.png"), plot_confusion(
        winner_entry["test"]["confusion_matrix"],
        f"{winner_entry['family']} on {winner_entry['features']} (test)"))
    write_report(out, summary)
    write_dashboard(out)
    return summary
