"""Metrics, the confusion-matrix plot and the Markdown report."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from dermray.domain import CLASSES
from dermray.io import storage
from dermray.models.bundle import BundleSpec
from dermray.models.policies import describe
from dermray.report.embedding_map import markdown_section

logger = logging.getLogger(__name__)


def metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, log-loss, per-class P/R/F1, one-vs-rest ROC AUC and
    the confusion matrix (rows: true class, columns: predicted), over the 7 classes."""

    labels = list(range(len(CLASSES)))
    y_true = np.asarray(y_true)
    proba = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    y_pred = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    per_class = {}
    for i, cls in enumerate(CLASSES):
        positives = y_true == i
        auc = (float(roc_auc_score(positives, proba[:, i]))
               if 0 < positives.sum() < len(y_true) else None)
        per_class[cls] = {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i]), "roc_auc": auc}
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "log_loss": float(log_loss(y_true, proba, labels=labels)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def plot_confusion(matrix: list[list[int]], title: str) -> bytes:
    """Row-normalised confusion matrix with counts, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name} | {m['n']} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
            f"{m['macro_f1']:.3f} | {m['log_loss']:.3f} |")


def write_report(out: str, summary: dict[str, Any]) -> str:
    """``OUT/report.md``: the winner, the best trial per family, per-class figures."""
    win = summary["winner"]
    lines = [
        "# dermray report", "",
        (f"Winner (highest validation accuracy of {summary['n_trials']} trials): **{win['family']}** "
        f"on `{win['features']}`"), "", "```", str(win["params"]), "```", "",
        *([(f"The soft-vote ensemble won: its out-of-fold validation accuracy "
            f"{win['val_out_of_fold_accuracy']:.3f} beat the best trial's (see 'Ensemble "
            "candidate'); the val row below uses its final weights, fitted on all of "
            "validation."), ""] if "val_out_of_fold_accuracy" in win else []),
        "| split | n | accuracy | balanced accuracy | macro-F1 | log-loss |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("val", win["val"]), _row("test", win["test"]), "",
        "## Best trial of each family (test metrics computed once, after selection)", "",
        "| family | features | val accuracy | test accuracy | test balanced accuracy | test macro-F1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fam, best in summary["best_per_family"].items():
        lines.append(f"| {fam} | {best['features']} | {best['val']['accuracy']:.3f} | "
                     f"{best['test']['accuracy']:.3f} | {best['test']['balanced_accuracy']:.3f} | "
                     f"{best['test']['macro_f1']:.3f} |")
    lines += ensemble_lines(summary.get("ensemble"))
    lines += ["", "## Winner per class (test)", "",
              "| class | precision | recall | F1 | ROC AUC | support |",
              "| --- | --- | --- | --- | --- | --- |"]
    for cls, m in win["test"]["per_class"].items():
        auc = f"{m['roc_auc']:.3f}" if m["roc_auc"] is not None else "n/a"
        lines.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {auc} "
                     f"| {m['support']} |")
    lines += ["", *policy_lines(summary.get("policies"), summary.get("operating_points")), ""]

    lines += markdown_section(out, win["features"])
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              ("Splits are lesion-grouped: no lesion is in two splits. The winner was chosen on "
              "validation accuracy only; the test split was scored once, after selection."), ""]
    return storage.write_text(storage.join(out, "report.md"), "\n".join(lines))


def ensemble_lines(record: dict[str, Any] | None) -> list[str]:
    """Markdown: the soft-vote candidate, its members and weights, and why it won or lost."""
    if not record:
        return []
    lines = ["", "## Ensemble candidate", "", f"Rule: {record['rule']}.", "",
             "| trial | family | features | val accuracy | weight |", "| --- | --- | --- | --- | --- |"]
    for m in record["members"]:
        weight = f"{m['weight']:.3f}" if "weight" in m else "n/a"
        lines.append(f"| {m['trial_id']} | {m['family']} | {m['features']} | "
                     f"{m['val_accuracy']:.3f} | {weight} |")
    lines += ["", f"**{'Chosen' if record['chosen'] else 'Not chosen'}**: {record['reason']}."]
    if "out_of_fold" in record:
        lines.append(f"With the final weights (fitted on all of validation): val accuracy "
                     f"{record['val']['accuracy']:.3f} (in-sample), test accuracy "
                     f"{record['test']['accuracy']:.3f}, test balanced accuracy "
                     f"{record['test']['balanced_accuracy']:.3f}.")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def policy_lines(policies: dict[str, Any] | None,
                 points: dict[str, Any] | None = None) -> list[str]:
    """Markdown: every operating point's rule (from ``points``, the fitted parameters) and test
    metrics, and calibration before/after scaling."""
    if not policies:
        return []
    test, val = policies["test"], policies["val"]
    lines = ["## Operating points of the winner (chosen on validation; test below)", "",
             "| policy | rule | accuracy | balanced accuracy | melanoma sensitivity | melanoma "
             "specificity | " + " | ".join(f"recall {c}" for c in CLASSES) + " |",
             "| --- " * (6 + len(CLASSES)) + "|"]
    for name, m in test["policies"].items():
        lines.append(f"| {name} | {describe(points, name)} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m['balanced_accuracy'])} | "
                     f"{_fmt(m['melanoma_sensitivity'])} | {_fmt(m['melanoma_specificity'])} | "
                     + " | ".join(_fmt(m["recall"][c]) for c in CLASSES) + " |")
    lines += ["", (f"Expected calibration error (test): {test['ece_before']:.3f} before "
              f"temperature scaling, {test['ece_after']:.3f} after (validation: "
              f"{val['ece_before']:.3f} -> {val['ece_after']:.3f})."),
              "`dermray predict --policy NAME` applies one."]
    return lines


WEIGHTS_WORDS = {"keras": "Keras' own ImageNet weights", "file": "a weights file of its own"}


def weights_lines(bundle: BundleSpec) -> list[str]:
    """The model card's backbone weights: by identity and origin; random weights said loudly."""
    if not bundle.backbones:
        return []
    lines = ["## Backbone weights"]
    if bundle.random_backbones:
        names = ", ".join(bundle.random_backbones)
        lines += [(f"**Random weights**: {names} ran on seeded random weights (weights: none, "
                   "as the demo trains). The figures below are of that toy setting; on real "
                   "images this model's predictions are meaningless."), ""]
    lines += [f"- {b.name}: {WEIGHTS_WORDS[b.weights_origin]} `{b.weights_name}` "
              f"({b.weights_identity})" for b in bundle.backbones if not b.random_weights]
    return [*lines, ""] if lines[-1] else lines


def member_lines(bundle: BundleSpec) -> list[str]:
    """The model card's ensemble members: each trial's family, features and weight."""
    if not bundle.members:
        return []
    return ["## Ensemble members (soft vote: the weighted mean of their probabilities)",
            *[f"- {m.family} on `{m.features}` (trial {m.trial_id}): weight {m.weight:.3f}"
              for m in bundle.members], ""]


def model_card(bundle: BundleSpec, extract_record: dict[str, Any]) -> str:
    """model_card.md of a bundle: intended use, data and split, metrics per class and per
    policy, and the limits a user must know."""
    metrics, ext = bundle.metrics, extract_record.get("config", {})
    rows = extract_record.get("rows", {})
    per_split = next(iter(rows.values()), {}).get("per_split", {}) if rows else {}
    test = metrics["test"]
    lines = [
        f"# Model card: dermray {bundle.family} on `{bundle.features}`", "",
        "## Intended use",
        ("Research on dermatoscopic image classification (HAM10000's 7 diagnoses). **Not a "
        "diagnostic device**: not validated for clinical use, not a substitute for a "
        "dermatologist, no regulatory clearance."), "",
        "## Data and split",
        ("HAM10000 (Tschandl et al., Sci. Data 5, 180161, 2018): dermatoscopic images from two "
        "sites (Austria, Australia), labels by histopathology, follow-up, consensus or confocal "
        "microscopy. Lesion-grouped split: no lesion is in two splits; the model and its "
        "operating points were chosen on validation only, the test split was scored once."),
        (f"Embedding rows per split: {per_split or 'n/a'}; images at "
        f"{bundle.image_size}x{bundle.image_size} pixels; backbones: "
        f"{', '.join(b.name for b in bundle.backbones) or 'fine-tuned CNN'}; "
        f"test-time views: {bundle.tta_views}; augmentation: {ext.get('augment', 'n/a')}."),
        "", *weights_lines(bundle), *member_lines(bundle), "## Test metrics (argmax)",
        (f"accuracy {test['accuracy']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, "
        f"macro-F1 {test['macro_f1']:.3f} on {test['n']} images."), "",
        "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |",
        *[f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
          for c, m in test["per_class"].items()], "",
        *policy_lines(metrics.get("policies"), bundle.operating_points), "",
        "## Known limits",
        ("- Skin types: HAM10000 is mostly fair-skinned European and Australian patients; "
        "performance on darker skin types is unknown."),
        ("- Dermoscopes and sites: two sites' dermoscopes and photography; other devices, "
        "clinical (non-dermatoscopic) photos and other image pipelines are out of distribution."),
        (f"- Image sizes: trained on images resized to {bundle.image_size} px; the classes' "
        "shares in the data (nv 67%) are not those of any clinic."),
        "- Seven diagnoses only: any other lesion is forced into one of them.",
        ("- Calibration and thresholds were fitted on one validation split; they move with the "
        "population."), ""]
    return "\n".join(lines)
