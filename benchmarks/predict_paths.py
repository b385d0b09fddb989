"""`dermray predict`'s two paths on the same images, in one run: the local loop (one process,
bounded batches) against the Ray Data job (decode tasks -> predictor actors -> streamed Parquet).

Both are timed from the bundle on disk to the last row written, the model build included (what a
user waits for); Ray's own start (``ray.init``) is timed apart. The probabilities of the two are
compared row by row (the largest absolute difference is reported).

    python benchmarks/predict_paths.py                          # 256 synthetic images, 64 px,
                                                                # seeded random ResNet50
    python benchmarks/predict_paths.py --weights ../shared/weights/resnet50_..._notop.h5 \
        --image-size 224 --images ../shared/data/ham10000/images_200x150 --json out/bench.json

The model is a ResNet50 bundle with a logistic head of fixed random weights (no training: the
cost of a head is negligible beside the backbone's, and the numbers compared are the same either
way).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def make_bundle(directory: Path, weights: str, image_size: int) -> Path:
    """A resnet50 + logistic bundle in ``directory`` (random head weights, seeded)."""
    from dermray.domain import CLASSES
    from dermray.models.backbones import weights_identity
    from dermray.models.bundle import BackboneRecord, BundleSpec
    from dermray.models.heads.logistic import LogisticHead

    rng = np.random.default_rng(0)
    head = LogisticHead()
    head.coef_ = rng.normal(0, 0.05, (len(CLASSES), 2048))
    head.intercept_ = np.zeros(len(CLASSES))
    head.mean_, head.scale_ = np.zeros(2048), np.ones(2048)
    head.classes_, head.n_features_in_ = np.arange(len(CLASSES)), 2048
    head.save(directory / "head")
    record = BackboneRecord.of("resnet50", weights_identity(weights, "resnet50"),
                               Path(weights).name if weights != "none" else "")
    BundleSpec(family="logistic", features="resnet50", backbones=(record,), image_size=image_size,
               tta_views=0, seed=0, params={}, trial_id="bench", metrics={}).write(directory)
    return directory


def images(folder: str | None, n: int, work: Path) -> list[Path]:
    if folder:
        files = sorted(p for p in Path(folder).rglob("*.jpg"))[:n]
    else:
        from dermray.data.synth import write_synth_dataset

        write_synth_dataset(work / "synth", n=n, seed=0)
        files = sorted((work / "synth").rglob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images in {folder}; need {n}")
    return files


def steady(n: int, wall: float, first_s: float | None, first_rows: int) -> float | None:
    """Images/s after the first batch (model built and compiled); None if it was the only one."""
    if first_s is None or n <= first_rows or wall <= first_s:
        return None
    return round((n - first_rows) / (wall - first_s), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--weights", default="none", help="a ResNet50 notop .h5, or none")
    parser.add_argument("--images", help="a folder of JPEGs (default: synthetic ones)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ray-first", action="store_true",
                        help="time the Ray path first (default: the local path first)")
    parser.add_argument("--json", default=str(REPO / "out" / "bench_predict_paths.json"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from dermray.models.bundle import load_bundle
    from dermray.models.predict_io import Limits, iter_predictions
    from dermray.stages.predict import run_predict_ray

    work = Path(tempfile.mkdtemp(prefix="dermray-bench-"))
    model = make_bundle(work / "model", args.weights, args.image_size)
    files = images(args.images, args.n, work)
    limits = Limits(batch_size=args.batch_size)
    weights_dirs = [str(Path(args.weights).parent)] if args.weights != "none" else []

    def run_local() -> tuple[pd.DataFrame, list[str], float, tuple[float, int]]:
        start = time.perf_counter()
        bundle = load_bundle(model, weights_dirs=weights_dirs)
        frames, problems, first = [], [], None
        for frame, found in iter_predictions(bundle, files, limits=limits):
            first = first or (time.perf_counter() - start, len(frame))
            frames.append(frame)
            problems += found
        return pd.concat(frames, ignore_index=True), problems, time.perf_counter() - start, first

    def run_ray() -> tuple[dict, float, float]:
        start = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        result = run_predict_ray(str(model), [str(f) for f in files], str(out), limits=limits,
                                 weights_dirs=weights_dirs)
        ray_s = time.perf_counter() - start
        ray.shutdown()
        return result, init_s, ray_s

    out = work / "preds.parquet"
    # the order is a flag: on a shared machine, run both orders to see what the load did
    if args.ray_first:
        result, init_s, ray_s = run_ray()
        local, problems, local_s, first = run_local()
    else:
        local, problems, local_s, first = run_local()
        result, init_s, ray_s = run_ray()

    cols = [c for c in local if c.startswith("p_")]
    theirs = pd.read_parquet(out).set_index("path").loc[local["path"]]
    diff = float(np.abs(theirs[cols].to_numpy(float) - local[cols].to_numpy(float)).max())
    record = {
        "images": len(files), "image_size": args.image_size,
        "weights": "none" if args.weights == "none" else Path(args.weights).name,
        "batch_size": args.batch_size, "cpus": os.cpu_count(),
        "order": "ray, local" if args.ray_first else "local, ray",
        "load_average_1m": round(os.getloadavg()[0], 1),
        "local_s": round(local_s, 2), "local_img_s": round(len(files) / local_s, 2),
        "ray_init_s": round(init_s, 2), "ray_s": round(ray_s, 2),
        "ray_img_s": round(len(files) / ray_s, 2),
        "ray_img_s_with_init": round(len(files) / (ray_s + init_s), 2),
        "ratio_ray_over_local": round(local_s / ray_s, 3),
        # after the first batch: the model is built and compiled (steady state)
        "local_steady_img_s": steady(len(files), local_s, *first),
        "ray_steady_img_s": steady(len(files), ray_s, result["first_batch_s"],
                                   result["first_batch_rows"]),
        "local_first_batch_s": round(first[0], 2), "ray_first_batch_s": result["first_batch_s"],
        "max_abs_prob_diff": diff, "rows": [len(local), result["rows"]],
        "skipped": [len(problems), result["skipped"]], "actor_layout": result["actor_layout"],
    }
    print(f"\n{len(files)} images, {args.image_size} px, ResNet50 weights {record['weights']}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'local (one process)':<28}{local_s:>10.2f}{record['local_img_s']:>12.2f}")
    print(f"{'Ray Data (after ray.init)':<28}{ray_s:>10.2f}{record['ray_img_s']:>12.2f}")
    print(f"{'Ray Data (with ray.init)':<28}{ray_s + init_s:>10.2f}"
          f"{record['ray_img_s_with_init']:>12.2f}")
    print(f"{'steady state (after batch 1)':<28}{'local':>10}{record['local_steady_img_s']:>12}")
    print(f"{'steady state (after batch 1)':<28}{'Ray':>10}{record['ray_steady_img_s']:>12}")
    print(f"ratio Ray/local (images/s): {record['ratio_ray_over_local']:.3f}; "
          f"largest |p_ray - p_local|: {diff:.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
