"""The real-data results table of docs/results.md, recomputed from a real run's outputs.

Lists, on the lesion-grouped split of ``OUT`` (``dermray run --config
ray_jobs/configs/ham10000_local.yaml --out out/ham10000``):
- the best trial of each family and the ensemble candidate, as the search and selection scored
  them (``OUT/metrics.json``; the test split scored once per model, after selection);
- the best trial of each (family, features) pair from ``OUT/trials.csv`` (validation only: the
  metadata lever for XGBoost and for the cached fine-tune, each a full fit of the search);
- a one-lever ablation refitted here (frozen logistic, original views, then the
  class-balancing views; where the run extracted VGG19, VGG19 in place of ResNet50, fused beside
  it, and the metadata): about a minute each on 2 cores.

Prints Markdown and writes JSON. Deterministic: the slow test
``tests/integration/test_results_slow.py`` reruns it and compares with docs/results.md.

    python benchmarks/results_table.py --out out/ham10000 --json out/results.json

The cached fine-tune is not refitted here: a 12-epoch fit is ~25 minutes on 2 cores, and the
search's own trials are that fit (their numbers are in the first two tables).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dermray.domain import CLASSES

# one lever at a time, each row changing one thing against the row above it; "views":
# "original" trains on each train image once, "all" adds the class-balancing views; every row
# starts from its family's first search point (logistic: C=0.003, no class weights)
ABLATIONS = [
    ("frozen: logistic on resnet50_ms, original views",
     {"family": "logistic", "features": "resnet50_ms", "params": {}, "views": "original"}),
    ("+ class-balancing views",
     {"family": "logistic", "features": "resnet50_ms", "params": {}, "views": "all"}),
    # issue 18's lever 4, where the run extracted VGG19 (rows whose backbones the run lacks
    # are left out): VGG19 in place of ResNet50 and VGG19 fused beside it (each against the
    # class-balancing row), then the metadata (against the fused row)
    ("vgg19 in place of resnet50_ms",
     {"family": "logistic", "features": "vgg19", "params": {}, "views": "all"}),
    ("+ vgg19 fused beside resnet50_ms",
     {"family": "logistic", "features": "resnet50_ms+vgg19", "params": {}, "views": "all"}),
    ("+ metadata (resnet50_ms+vgg19+meta)",
     {"family": "logistic", "features": "resnet50_ms+vgg19+meta", "params": {}, "views": "all"}),
]
# the search settings the rows are built with
SEARCH: dict[str, Any] = {}


def inputs(out: str, family: str, features: str, split: str, views: str = "all"):
    """X, y of a split as the search gives them to a family; ``views="original"`` keeps only
    each train image's original view (no class-balancing views)."""
    from dermray.models.embeddings import load_activations
    from dermray.models.features import embedding_features
    from dermray.models.heads import ACTIVATIONS, get_family

    if get_family(family).input == ACTIVATIONS:
        X, y, frame = load_activations(out, features, split,
                                       views=views if split == "train" else "original")
        return X, y
    X, y, frame = embedding_features(out, features, split)
    if split == "train" and views == "original":
        keep = (frame["aug_index"] == 0).to_numpy()
        return X[keep], y[keep]
    return X, y


def extracted(out: str, features: str) -> bool:
    """Whether the run's OUT holds every backbone of a feature spec."""
    from dermray.models.embeddings import backbone_dir
    from dermray.models.features import parse_features

    return all(Path(backbone_dir(out, b)).is_dir() for b in parse_features(features)[0])


def head_params(out: str, family: str, params: dict[str, Any]) -> dict[str, Any]:
    """A row's constructor arguments, as the search builds them for the family's first point
    (its fixed parameters included: for cached_cnn the extraction's weights), then the row's."""
    from dermray.config import build_section
    from dermray.models.heads import get_family

    cfg = build_section("search", {**SEARCH, "out": out})
    spec = get_family(family)
    return {**spec.head_params(spec.first_point(cfg), cfg), **params}


def evaluate(out: str, family: str, features: str, params: dict[str, Any],
             views: str = "all", head=None) -> tuple[dict[str, Any], Any]:
    """Fit (or, given ``head``, only rescore) one head; metrics on val and test."""
    from dermray.models.heads import make_head
    from dermray.report.evaluate import metrics

    X_va, y_va = inputs(out, family, features, "val")
    X_te, y_te = inputs(out, family, features, "test")
    start = time.perf_counter()
    if head is None:
        X_tr, y_tr = inputs(out, family, features, "train", views)
        params = head_params(out, family, params)
        head = make_head(family, params)
        head.fit(X_tr, y_tr, eval_set=(X_va, y_va))
        n_train = len(y_tr)
    else:
        head.set_params(**{k: v for k, v in params.items() if k in head.get_params()})
        n_train = 0
    fit_s = time.perf_counter() - start
    val_p, test_p = head.predict_proba(X_va), head.predict_proba(X_te)
    score_s = time.perf_counter() - start - fit_s
    row = {"family": family, "features": features, "params": params, "views": views,
           "n_train": n_train, "fit_s": round(fit_s, 1), "score_s": round(score_s, 1),
           "val": metrics(y_va, val_p),
           "test": metrics(y_te, test_p), "policies": policies(out, val_p, y_va, test_p, y_te)}
    return row, head


def policies(out: str, val_p, y_va, test_p, y_te) -> dict[str, Any]:
    """The operating points (temperature, balanced, melanoma) fitted on validation, as the
    search fits them for its winner, and their test metrics."""
    import pandas as pd

    from dermray.models.policies import fit_operating_points, policy_report

    train = pd.read_parquet(Path(out) / "manifest.parquet").query("split == 'train'")
    prior = train["dx"].value_counts().reindex(list(CLASSES), fill_value=0).to_numpy(float)
    points = fit_operating_points(val_p, y_va, prior, {"melanoma_target": 0.90})
    return {"points": points, "test": policy_report(test_p, y_te, points)["policies"]}


def compute(out: str) -> dict[str, Any]:
    """The search's best trial per family and the ensemble candidate (as selection scored them,
    from metrics.json), the best trial per (family, features) from trials.csv, and the
    ablation, refitted here."""
    import pandas as pd

    path = Path(out) / "metrics.json"  # absent while the search has not ended
    result = json.loads(path.read_text()) if path.is_file() else {"best_per_family": {}}
    rows = []
    for family, entry in result["best_per_family"].items():
        row = {"family": family, "features": entry["features"], "val": entry["val"],
               "test": entry["test"],
               "name": f"best {family}" + (" (winner)" if family == result.get("family") else "")}
        rows.append(row)
    ensemble = result.get("ensemble") or {}
    if "val" in ensemble:  # val: with the final weights (in sample); chosen out of fold
        rows.append({"family": "ensemble", "features": ", ".join(
                         dict.fromkeys(m["features"] for m in ensemble["members"])),
                     "val": ensemble["val"], "test": ensemble["test"],
                     "name": "ensemble (soft vote)" + (
                         " (winner)" if result.get("family") == "ensemble" else "")})
    pairs = []
    trials_path = Path(out) / "trials.csv"
    if trials_path.is_file():
        trials = pd.read_csv(trials_path).dropna(subset=["val_accuracy"])
        for (family, features), group in trials.groupby(["family", "features"], sort=True):
            best = group.sort_values("val_accuracy", ascending=False).iloc[0]
            pairs.append({"name": f"{family} on {features}", "family": family,
                          "features": features, "trials": len(group),
                          "val_accuracy": float(best["val_accuracy"]),
                          "val_balanced_accuracy": float(best["val_balanced_accuracy"]),
                          "minutes": round(float(best["time_total_s"]) / 60, 1)})
    ablation = []
    head = None
    for name, change in ABLATIONS:
        if not extracted(out, change["features"]):
            continue
        row, head = evaluate(out, change["family"], change["features"], change["params"],
                             change["views"], head=None if change.get("refit", True) else head)
        row["name"] = name
        ablation.append(row)
        print(f"{name}: val {row['val']['accuracy']:.4f} test {row['test']['accuracy']:.4f} "
              f"bal {row['test']['balanced_accuracy']:.4f} ({row['fit_s']} s)", flush=True)
    # the exported winner's operating points, fitted on validation by selection, on test
    winner = {"name": next((r["name"] for r in rows if r["name"].endswith("(winner)")), ""),
              "policies": {"test": ((result.get("policies") or {}).get("test") or {}).get(
                  "policies", {})}}
    return {"families": rows, "pairs": pairs, "ablation": ablation,
            "ensemble": ensemble, "winner": winner}


def markdown(table: dict[str, Any]) -> str:
    def line(r: dict[str, Any]) -> str:
        t = r["test"]
        recalls = " / ".join(f"{t['per_class'][c]['recall']:.2f}" for c in CLASSES)
        return (f"| {r['name']} | {r['features']} | {r['val']['accuracy']:.4f} | "
                f"{t['accuracy']:.4f} | {t['balanced_accuracy']:.4f} | {t['macro_f1']:.4f} | "
                f"{recalls} |")

    head = ("| model | features | val acc | test acc | test bal. acc | test macro-F1 | "
            "test recall " + "/".join(CLASSES) + " |\n| --- | --- | --- | --- | --- | --- | --- |")

    def cost(r: dict[str, Any]) -> str:  # the lever's own minutes here: the fit, or scoring
        return f" {r['fit_s'] / 60:.1f} fit + {r['score_s'] / 60:.1f} scoring |"

    ablation_head = head.replace(" |\n", " | minutes on 2 cores |\n", 1) + " --- |"

    def policy_lines(r: dict[str, Any]) -> list[str]:
        out = []
        for name, m in r["policies"]["test"].items():
            out.append(f"| {r['name']} | {name} | {m['accuracy']:.4f} | "
                       f"{m['balanced_accuracy']:.4f} | {m['melanoma_sensitivity']:.3f} | "
                       f"{m['melanoma_specificity']:.3f} |")
        return out

    pol = ("| model | policy | test acc | test bal. acc | mel sensitivity | mel specificity |\n"
           "| --- | --- | --- | --- | --- | --- |")
    pair_lines = [("| search trials | features | best val acc | best val bal. acc | trials | "
                  "minutes (best trial) |"), "| --- | --- | --- | --- | --- | --- |",
                  *[f"| {p['name']} | {p['features']} | {p['val_accuracy']:.4f} | "
                    f"{p['val_balanced_accuracy']:.4f} | {p['trials']} | {p['minutes']} |"
                    for p in table.get("pairs", [])]]
    return "\n".join([head, *[line(r) for r in table["families"]], "", *pair_lines, "",
                      ablation_head,
                      *[line(r) + cost(r) for r in table["ablation"]], "", pol,
                      *(policy_lines(table["winner"]) if table.get("winner") else []),
                      *[x for r in table["ablation"] for x in policy_lines(r)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/ham10000")
    parser.add_argument("--json", default="out/results.json")
    args = parser.parse_args()
    table = compute(args.out)
    print(markdown(table))
    Path(args.json).write_text(json.dumps(table, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
