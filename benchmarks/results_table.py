"""The real-data results table of docs/results.md, recomputed from cached embeddings.

Refits, on the lesion-grouped split of ``OUT`` (``dermray run --config
ray_jobs/configs/ham10000_local.yaml --out out/ham10000``), the best trial of each family that
the search recorded in ``OUT/metrics.json``, plus a one-lever-at-a-time ablation of a fixed
logistic head; prints Markdown and writes JSON. Deterministic: the slow test
``tests/integration/test_results_slow.py`` reruns it and compares with docs/results.md.

    python benchmarks/results_table.py --out out/ham10000 --json out/results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dermray.config import CLASSES

ABLATION_BASE = {"features": "resnet50", "params": {"C": 0.1, "class_weight": "none"}}
ABLATIONS = [
    ("baseline: resnet50, logistic C=0.1", {}),
    ("features: multi-stage resnet50_ms", {"features": "resnet50_ms"}),
    ("features: + patient metadata", {"features": "resnet50+meta"}),
    ("class_weight: balanced", {"params": {"C": 0.1, "class_weight": "balanced"}}),
    ("prior correction chosen on val", {"prior_correction": True}),
]


def prior_correction(val_proba: np.ndarray, y_val: np.ndarray, train_y: np.ndarray,
                     max_acc_drop: float = 0.01) -> float:
    """alpha in p_c / prior_c**alpha that maximises val balanced accuracy while val accuracy
    drops by at most ``max_acc_drop``; chosen on validation only."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    prior = np.bincount(train_y, minlength=len(CLASSES)) / len(train_y)
    base = accuracy_score(y_val, val_proba.argmax(1))
    best, best_bal = 0.0, balanced_accuracy_score(y_val, val_proba.argmax(1))
    for alpha in np.linspace(0, 1, 21):
        pred = (val_proba / prior**alpha).argmax(1)
        acc, bal = accuracy_score(y_val, pred), balanced_accuracy_score(y_val, pred)
        if acc >= base - max_acc_drop and bal > best_bal:
            best, best_bal = float(alpha), bal
    return best


def evaluate(out: str, family: str, features: str, params: dict[str, Any],
             correct_prior: bool = False) -> dict[str, Any]:
    from dermray.evaluate import metrics
    from dermray.features import embedding_features
    from dermray.heads import make_head

    X_tr, y_tr, _ = embedding_features(out, features, "train")
    X_va, y_va, _ = embedding_features(out, features, "val")
    X_te, y_te, _ = embedding_features(out, features, "test")
    start = time.perf_counter()
    head = make_head(family, params).fit(X_tr, y_tr, eval_set=(X_va, y_va))
    fit_s = time.perf_counter() - start
    val_p, test_p = head.predict_proba(X_va), head.predict_proba(X_te)
    alpha = 0.0
    if correct_prior:
        alpha = prior_correction(val_p, y_va, y_tr)
        prior = np.bincount(y_tr, minlength=len(CLASSES)) / len(y_tr)
        val_p = val_p / prior**alpha
        test_p = test_p / prior**alpha
    return {"family": family, "features": features, "params": params, "alpha": alpha,
            "fit_s": round(fit_s, 1), "val": metrics(y_va, val_p), "test": metrics(y_te, test_p)}


def head_params_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a family's best trial, as the search built them."""
    from dermray.config import build_section
    from dermray.search import head_params

    cfg = build_section("search", {"xgb_max_estimators": 300, "mlp_max_epochs": 60})
    return head_params({"family": entry["family"], **entry["params"]}, cfg)


def compute(out: str) -> dict[str, Any]:
    result = json.loads((Path(out) / "metrics.json").read_text())
    rows = []
    for family, entry in result["best_per_family"].items():
        row = evaluate(out, family, entry["features"], head_params_of(entry))
        row["name"] = f"best {family}" + (" (winner)" if family == result["family"] else "")
        rows.append(row)
    ablation = []
    for name, change in ABLATIONS:
        spec = {**ABLATION_BASE, **change}
        row = evaluate(out, "logistic", spec["features"], spec["params"],
                       correct_prior=spec.get("prior_correction", False))
        row["name"] = name
        ablation.append(row)
    return {"families": rows, "ablation": ablation}


def markdown(table: dict[str, Any]) -> str:
    def line(r: dict[str, Any]) -> str:
        t = r["test"]
        recalls = " / ".join(f"{t['per_class'][c]['recall']:.2f}" for c in CLASSES)
        return (f"| {r['name']} | {r['features']} | {r['val']['accuracy']:.4f} | "
                f"{t['accuracy']:.4f} | {t['balanced_accuracy']:.4f} | {t['macro_f1']:.4f} | "
                f"{recalls} |")

    head = ("| model | features | val acc | test acc | test bal. acc | test macro-F1 | "
            "test recall " + "/".join(CLASSES) + " |\n| --- | --- | --- | --- | --- | --- | --- |")
    return "\n".join([head, *[line(r) for r in table["families"]], "", head,
                      *[line(r) for r in table["ablation"]]])


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
