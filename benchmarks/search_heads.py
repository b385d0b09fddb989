"""Head search on cached real embeddings: Optuna TPE against random search, same budget, same
run, and trials per minute per family on this machine.

    python benchmarks/search_heads.py --out out/ham10000 --num-samples 12 --json out/bench_search.json

``--out`` must hold embeddings from the extract stage (``dermray run --config
ray_jobs/configs/ham10000_local.yaml --out out/ham10000``). Each algorithm runs its own Tune
experiment under OUT/bench_tune; the best val accuracy after every trial is printed for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def run(algorithm: str, args) -> dict:
    from dermray.config import build_section
    from dermray.stages.search import run_search

    storage = Path(args.out, "bench_tune").resolve()
    shutil.rmtree(storage / algorithm, ignore_errors=True)
    cfg = build_section("search", {
        "out": args.out, "families": args.families, "features": args.features,
        "num_samples": args.num_samples, "algorithm": algorithm, "max_concurrent": 2,
        "seed": args.seed, "xgb_max_estimators": args.xgb_max_estimators,
        "storage_path": str(storage), "experiment": algorithm, "seed_each_family": False,
        "grace_period": 10,
    })
    start = time.perf_counter()
    results = run_search(cfg, str(Path(args.out) / "manifest.parquet"), resume=False)
    wall = time.perf_counter() - start
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"family": r.config.get("family"), "features": r.config.get("features"),
                       "val_accuracy": m.get("val_accuracy"), "time_s": m.get("time_total_s"),
                       "ended": m.get("timestamp", 0), "error": bool(r.error)})
    trials.sort(key=lambda t: t["ended"])
    accs = [t["val_accuracy"] or 0.0 for t in trials]
    return {"wall_s": wall, "best_val_accuracy": max(accs),
            "best_so_far": list(np.maximum.accumulate(accs)), "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/ham10000")
    parser.add_argument("--json", default="out/bench_search.json")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=["logistic", "xgboost", "mlp"])
    parser.add_argument("--features", nargs="+", default=["resnet50", "resnet50+meta"])
    parser.add_argument("--xgb-max-estimators", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result = {"num_samples": args.num_samples, "families": args.families,
              "features": args.features}
    for algorithm in ("tpe", "random"):
        result[algorithm] = run(algorithm, args)
    per_family: dict[str, list[float]] = {}
    for algorithm in ("tpe", "random"):
        for t in result[algorithm]["trials"]:
            if t["time_s"]:
                per_family.setdefault(t["family"], []).append(t["time_s"])
    result["trials_per_minute"] = {f: 60.0 / float(np.mean(v)) for f, v in per_family.items()}
    result["tpe_minus_random"] = result["tpe"]["best_val_accuracy"] - result["random"]["best_val_accuracy"]

    print(f"budget: {args.num_samples} trials each, families {args.families}, features {args.features}")
    print(f"{'trial':>5}{'tpe best':>10}{'random best':>13}")
    for i, (a, b) in enumerate(zip(result["tpe"]["best_so_far"], result["random"]["best_so_far"])):
        print(f"{i + 1:>5}{a:>10.4f}{b:>13.4f}")
    print(f"best val accuracy: tpe {result['tpe']['best_val_accuracy']:.4f}, random "
          f"{result['random']['best_val_accuracy']:.4f} (wall {result['tpe']['wall_s']:.0f}s / "
          f"{result['random']['wall_s']:.0f}s)")
    for fam, rate in result["trials_per_minute"].items():
        print(f"{fam:<10} {rate:6.2f} trials/min (one trial at a time; 2 run concurrently)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
