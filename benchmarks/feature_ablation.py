"""What each feature set buys, on one real run's split, in one run: VGG19, the fusion, metadata.

Issue 18's lever 4 asks what VGG19 adds beside ResNet50. This reads a finished extraction
(``--out``: its pooled embeddings, ``resnet50_ms`` and ``vgg19`` among them) and, for each
feature spec of ``--features`` (the search's own specs: ``resnet50_ms+vgg19+meta`` joins the two
backbones' embeddings and the metadata), fits

(a) the logistic head (the search's ``LogisticHead``, standardised, no class weights) at each
    ``--logistic-c``, the best C by validation accuracy;
(b) with ``--xgb-params`` (a JSON of the search's xgboost parameters, e.g. the best trial's), the
    XGBoost head with those parameters, early-stopped on validation as in the search.

Train uses every view of the class-balancing plan; validation and test average an image's views
(the search's own ``embedding_features``). The settings are chosen on validation only; ``--test``
also scores the chosen model of each spec on the test split (for the ablation table of
docs/results.md), which never chooses anything. It prints each fit's figures and seconds.

    python benchmarks/feature_ablation.py --out out/ham10000 \
        --features resnet50_ms resnet50_ms+meta vgg19 resnet50_ms+vgg19 resnet50_ms+vgg19+meta \
        --test --json out/bench_feature_ablation.json
"""

from __future__ import annotations

import argparse
import json
import time

FIGURES = ("accuracy", "balanced_accuracy", "macro_f1")


def rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in FIGURES}


def fit_and_score(head, data: dict, test: bool) -> dict[str, object]:
    from dermray.report.evaluate import metrics

    (X, y), (Xv, yv) = data["train"], data["val"]
    start = time.perf_counter()
    head.fit(X, y, eval_set=(Xv, yv))
    seconds = time.perf_counter() - start
    row: dict[str, object] = {"fit_s": round(seconds, 1),
                              "val": rounded(metrics(yv, head.predict_proba(Xv)))}
    if test:
        Xt, yt = data["test"]
        row["test"] = rounded(metrics(yt, head.predict_proba(Xt)))
    return row


def ablate(spec: str, args: argparse.Namespace) -> dict[str, object]:
    from dermray.models.features import embedding_features
    from dermray.models.heads import make_head

    splits = ("train", "val", "test") if args.test else ("train", "val")
    data = {}
    for split in splits:
        X, y, _ = embedding_features(args.out, spec, split)
        data[split] = (X, y)
    result: dict[str, object] = {"features": spec, "dims": int(data["train"][0].shape[1]),
                                 "train_rows": len(data["train"][1])}
    tried = []
    for c in args.logistic_c:
        row = fit_and_score(make_head("logistic", {"C": c}), data, args.test)
        tried.append({"C": c, **row})
        print(f"{spec:28s} logistic C={c:<6g} val {row['val']['accuracy']:.4f} "
              f"(bal {row['val']['balanced_accuracy']:.4f})  {row['fit_s']:.0f} s", flush=True)
    best = max(tried, key=lambda r: r["val"]["accuracy"])  # chosen on validation only
    result["logistic"] = {"chosen": best, "tried": tried}
    if args.xgb_params:
        params = {k.removeprefix("xgboost_"): v for k, v in json.loads(args.xgb_params).items()}
        params.setdefault("n_estimators", args.xgb_estimators)
        row = fit_and_score(make_head("xgboost", params), data, args.test)
        result["xgboost"] = {"params": params, **row}
        print(f"{spec:28s} xgboost          val {row['val']['accuracy']:.4f} "
              f"(bal {row['val']['balanced_accuracy']:.4f})  {row['fit_s']:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a finished run's OUT (its embeddings)")
    parser.add_argument("--features", nargs="+",
                        default=["resnet50_ms", "resnet50_ms+meta", "vgg19", "vgg19+meta",
                                 "resnet50_ms+vgg19", "resnet50_ms+vgg19+meta"])
    parser.add_argument("--logistic-c", nargs="+", type=float, default=[0.03, 0.1, 0.3])
    parser.add_argument("--xgb-params", default="",
                        help="JSON of xgboost parameters (search names or head names; "
                             "only the xgboost_* entries of a trial's params)")
    parser.add_argument("--xgb-estimators", type=int, default=400,
                        help="rounds at most (the search's xgb_max_estimators; early stopping "
                             "on validation may end sooner)")
    parser.add_argument("--test", action="store_true",
                        help="also score each spec's validation-chosen model on the test split")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    results = [ablate(spec, args) for spec in args.features]
    print("\n| features | dims | logistic C | val acc | val bal"
          + (" | test acc | test bal" if args.test else "") + " |")
    for r in results:
        chosen = r["logistic"]["chosen"]
        line = (f"| {r['features']} | {r['dims']} | {chosen['C']:g} | "
                f"{chosen['val']['accuracy']:.4f} | {chosen['val']['balanced_accuracy']:.4f}")
        if args.test:
            line += f" | {chosen['test']['accuracy']:.4f} | {chosen['test']['balanced_accuracy']:.4f}"
        print(line + " |")
        if "xgboost" in r:
            x = r["xgboost"]
            line = (f"| {r['features']} (xgboost) | {r['dims']} | - | {x['val']['accuracy']:.4f} | "
                    f"{x['val']['balanced_accuracy']:.4f}")
            if args.test:
                line += f" | {x['test']['accuracy']:.4f} | {x['test']['balanced_accuracy']:.4f}"
            print(line + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"out": args.out, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
