"""The cached fine-tune against the frozen logistic regression, on one real run's split, in one run.

Issue 18's lever 1: the cached conv5_block3 fine-tune (``CachedFinetuneHead``, the search
family's own fit path: validation per epoch with the four flip views, stopped on validation
accuracy, the best epoch restored) must beat a frozen-ResNet50 logistic regression on the same
lesion-grouped split by 2 points of validation accuracy. Both arms read a finished extraction
(``--out``: its cached ``resnet50_c5b2`` maps and its pooled embeddings); nothing is extracted.

(a) the fine-tune with the settings given (learning rate, maps per step, train views: every
    augmented view or the originals only, metadata joined after the pooling or not, the
    classifier's start: random or the logistic regression on the block's pooled features, whose
    own validation figures are then printed as epoch 0);
(b) the frozen logistic on ``--logistic-features`` (``resnet50``: the same network's pooled last
    stage; the same train views as (a)) at each ``--logistic-c``, the best C by validation.

It prints every epoch's validation figures, the restored epoch, the fine-tune's training rate
(train maps per second of a whole epoch, validation included) and the difference in points.
Only validation is read: the test split is left alone.

    python benchmarks/cached_lever.py --out out/ham10000 --views original --learning-rate 1e-4 \
        --batch-size 64 --meta --json out/bench_cached_lever.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMRAY_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
FIGURES = ("accuracy", "balanced_accuracy", "macro_f1")


def rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in FIGURES}


def train_rows(frame, views: str) -> np.ndarray:
    """The train rows to keep: every view, or the original (aug_index 0) ones."""
    if views == "all":
        return np.ones(len(frame), bool)
    return (frame["aug_index"].to_numpy() == 0)


def finetune(args: argparse.Namespace) -> dict[str, object]:
    from dermray.models.features import N_METADATA, activation_features
    from dermray.models.heads.cached import CachedFinetuneHead
    from dermray.report.evaluate import metrics

    spec = "resnet50_c5b2+meta" if args.meta else "resnet50_c5b2"
    X, y, frame = activation_features(args.out, spec, "train")
    keep = train_rows(frame, args.views)
    X, y = X[keep], y[keep]
    Xv, yv, _ = activation_features(args.out, spec, "val")
    head = CachedFinetuneHead(weights=str(args.weights), epochs=args.epochs,
                              patience=args.patience, learning_rate=args.learning_rate,
                              batch_size=args.batch_size, dropout=args.dropout,
                              meta=N_METADATA if args.meta else 0, head_init=args.head_init,
                              init_C=args.init_c)
    epochs: list[dict[str, object]] = []
    start = time.perf_counter()
    if args.head_init == "logistic":  # the start itself, scored as the family scores an epoch
        _, head.model_ = head.start(X, y)
        head._set_fitted(X)
        epochs.append({"epoch": 0, "s": round(time.perf_counter() - start, 1),
                       **rounded(metrics(yv, head.predict_proba(Xv)))})
        print("  start", json.dumps(epochs[-1]), flush=True)
        start = time.perf_counter()

    def progress(epoch: int, proba: np.ndarray, train_loss: float | None = None, **_) -> None:
        m = metrics(yv, proba)
        epochs.append({"epoch": epoch, "s": round(time.perf_counter() - start, 1),
                       **rounded(m), "train_loss": round(float(train_loss or np.nan), 4)})
        print("  epoch", json.dumps(epochs[-1]), flush=True)

    head.fit(X, y, eval_set=(Xv, yv), progress=progress)
    final = rounded(metrics(yv, head.predict_proba(Xv)))
    trained = [e for e in epochs if e["epoch"] > 0]
    seconds = np.diff([0.0] + [float(e["s"]) for e in trained])
    median = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))
    best = max(trained, key=lambda e: e["accuracy"])  # the stopping rule's choice
    return {"features": spec, "views": args.views, "train_maps": len(X), "val_maps": len(Xv),
            "learning_rate": args.learning_rate, "batch_size": args.batch_size,
            "dropout": args.dropout, "head_init": args.head_init, "init_C": args.init_c,
            "epochs": epochs, "restored_epoch": best["epoch"],
            "val": final, "median_epoch_s": round(median, 1),
            "family_maps_s": round(len(X) / median, 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def logistic(args: argparse.Namespace) -> dict[str, object]:
    from dermray.models.features import embedding_features
    from dermray.models.heads.logistic import LogisticHead
    from dermray.report.evaluate import metrics

    X, y, frame = embedding_features(args.out, args.logistic_features, "train")
    keep = train_rows(frame, args.views)
    X, y = X[keep], y[keep]
    Xv, yv, _ = embedding_features(args.out, args.logistic_features, "val")
    per_c = {}
    for c in args.logistic_c:
        per_c[str(c)] = rounded(metrics(yv, LogisticHead(C=c).fit(X, y).predict_proba(Xv)))
        print("  logistic C", c, json.dumps(per_c[str(c)]), flush=True)
    best = max(per_c, key=lambda c: per_c[c]["accuracy"])
    return {"features": args.logistic_features, "train_rows": len(X), "per_C": per_c,
            "best_C": float(best), "val": per_c[best]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a finished extraction's OUT")
    parser.add_argument("--views", choices=("all", "original"), default="all",
                        help="train views: every augmented view, or the originals only")
    parser.add_argument("--meta", action="store_true", help="age, sex, localization joined")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--head-init", choices=("random", "logistic"), default="random",
                        help="the classifier's start: random, or the logistic regression on "
                             "the block's pooled features (linear probing, then fine-tuning)")
    parser.add_argument("--init-c", type=float, default=0.003,
                        help="C of that logistic regression")
    parser.add_argument("--weights", default=str(WEIGHTS), help="ResNet50 weights (.h5)")
    parser.add_argument("--logistic-features", default="resnet50")
    parser.add_argument("--logistic-c", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--json")
    args = parser.parse_args()

    print("frozen logistic:", flush=True)
    frozen = logistic(args)
    print("cached fine-tune:", flush=True)
    tuned = finetune(args)
    result = {"cpus": os.cpu_count(), "logistic": frozen, "cached": tuned,
              "difference_pp": round(100 * (tuned["val"]["accuracy"]
                                            - frozen["val"]["accuracy"]), 2)}
    print(f"cached fine-tune val accuracy {tuned['val']['accuracy']:.4f} (epoch "
          f"{tuned['restored_epoch']}), frozen logistic {frozen['val']['accuracy']:.4f} "
          f"(C={frozen['best_C']}): {result['difference_pp']:+.2f} pp; "
          f"{tuned['family_maps_s']} maps/s a whole epoch")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
