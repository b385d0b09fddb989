"""Extraction throughput: the bare model against the whole Ray Data pipeline, in one run.

Both backbones with the real ImageNet weights of ../shared where present (ResNet50 and VGG19).
The real config's multi-output shape and its step-by-step breakdown are in
``extract_breakdown.py``.

(a) bare: the backbone's fastest direct call on pre-decoded arrays in this process (``predict``,
    a plain ``tf.function`` and an XLA-compiled call are all timed, ``predict`` once and the two
    compiled calls in turn ``--rounds`` times before the job and again after it, on the same
    model; each call's fastest round is kept;
    the best is ``bare_img_s``, and ``ratio_same_call`` compares the job with the call it runs);
(b) pipeline: ``run_extract`` from JPEG files to Parquet on a local Ray; its steady-state rate
    (rows written between the first and the last part file) is ``pipeline_img_s``, the rate with
    Ray start, model build and compile included is ``pipeline_e2e_img_s``;
(c) decode+resize alone, 600x450 -> SIZE, JPEG draft mode against a full decode;
(d) numpy float32 matrix multiply (sgemm) GFLOP/s, to express (a) as a share of the hardware.

    python benchmarks/extract_throughput.py --json out/bench_extract.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMRAY_SHARED", REPO.parent / "shared"))
HAM = SHARED / "data" / "ham10000"
WEIGHTS = SHARED / "weights" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# real ImageNet weights per application, where ../shared has them (VGG19's is Keras' own file)
REAL_WEIGHTS = {"resnet50": WEIGHTS,
                "vgg19": SHARED / "weights" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"}


def rate(fn, n_images: int, repeats: int = 1) -> float:
    """Images per second of ``fn`` (already warmed up), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def sgemm_gflops(n: int = 2048) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def decode_rates(paths: list[Path], size: int) -> dict[str, float]:
    from dermray.data.augment import decode_image

    data = [p.read_bytes() for p in paths]
    out = {}
    for name, draft in (("decode_draft_img_s", True), ("decode_full_img_s", False)):
        decode_image(data[0], size, draft=draft)
        out[name] = rate(lambda d=draft: [decode_image(x, size, draft=d) for x in data],
                         len(data), repeats=3)
    return out


COMPILED = ("tf_function", "xla")  # the two compiled calls, timed in turn


def direct_calls(backbone: str, weights: str, size: int, batch: int, n: int):
    """The backbone built once, with its three direct calls (``predict``, a plain
    ``tf.function``, XLA) on one pre-decoded batch, warmed up (XLA compiles here). Returns
    ``timed(rounds, names)``: img/s of each named call over ``n`` images, the calls in turn
    ``rounds`` times (each round's rate kept), so that this VM's drift from minute to minute
    hits them alike; the job is timed between two such calls on the same model."""
    from dermray.models.backbones import build_extractor, compile_forward, preprocess

    model = build_extractor(backbone, weights, size)
    x = preprocess(backbone, np.random.default_rng(0).integers(0, 255, (batch, size, size, 3),
                                                               dtype=np.uint8))
    steps = max(1, n // batch)
    compiled = [compile_forward(model, jit_compile=jit) for jit in (False, True)]
    calls = {"predict": lambda: model.predict(x, batch_size=batch, verbose=0),
             **{name: (lambda f=fn: f(x)) for name, fn in zip(COMPILED, compiled)}}
    for call in calls.values():
        call()

    def timed(rounds: int, names) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name in names:
                out.setdefault(name, []).append(
                    rate(lambda c=calls[name]: [c() for _ in range(steps)], steps * batch))
        return out

    return timed


def pipeline_rate(backbone: str, weights: str, size: int, batch: int, n: int) -> dict[str, float]:
    """Run the real extraction on the first ``n`` real 200x150 images, fresh output folder."""
    import pyarrow.dataset as pads
    import ray

    from dermray.config import ExtractConfig
    from dermray.data.catalog import build_catalog, build_manifest, write_manifest
    from dermray.models.embeddings import backbone_dir
    from dermray.stages.extract import run_extract

    out = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    catalog = build_catalog(str(HAM / "metadata_images_200x150.csv"), [str(HAM / "images_200x150")])
    manifest = build_manifest(catalog, (0.7, 0.15, 0.15), seed=0)
    manifest = manifest.sample(n=n, random_state=0).sort_values("image_id")
    write_manifest(manifest, str(out), {"benchmark": True})
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    cfg = ExtractConfig(manifest=str(out / "manifest.parquet"), out=str(out),
                        backbones=(backbone,), weights={backbone: weights}, image_size=size,
                        batch_size=batch, augment=False)
    start = time.perf_counter()
    record = run_extract(cfg)
    e2e = n / (time.perf_counter() - start)
    files = sorted(Path(backbone_dir(out, backbone)).rglob("*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [pads.dataset(str(f)).count_rows() for f in files]
    span = files[-1].stat().st_mtime - files[0].stat().st_mtime
    steady = (sum(rows) - rows[0]) / span if span > 0 else float("nan")
    assert record["rows"][backbone]["rows"] == n
    return {"pipeline_img_s": steady, "pipeline_e2e_img_s": e2e, "pipeline_wall_s": record["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="out/bench_extract.json")
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "vgg19"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bare-images", type=int, default=128)
    parser.add_argument("--pipeline-images", type=int, default=768,
                        help="images through the job: 24 batches, a steady window of about "
                             "100 s for VGG19, so that the VM's drift averages out as it does "
                             "in the median round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the two compiled calls, before and after the job each")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from dermray.models.backbones import configure_devices, get_spec, use_xla

    originals = sorted((HAM / "originals_600x450").glob("*.jpg"))
    result: dict = {"image_size": args.image_size, "batch_size": args.batch_size,
                    "cpus": os.cpu_count(), "sgemm_gflops": sgemm_gflops()}
    result.update(decode_rates(originals, args.image_size))
    result["backbones"] = {}
    for backbone in args.backbones:
        real = REAL_WEIGHTS.get("resnet50" if backbone.startswith("resnet50") else backbone)
        weights = str(real) if real is not None and real.exists() else "none"
        # the direct calls before and after the job: the job is compared with the same minutes
        timed = direct_calls(backbone, weights, args.image_size, args.batch_size,
                             args.bare_images)
        rounds = {**timed(1, ("predict",)), **timed(args.rounds, COMPILED)}
        pipe = pipeline_rate(backbone, weights, args.image_size, args.batch_size,
                             args.pipeline_images)
        for name, after in timed(args.rounds, COMPILED).items():
            rounds[name] += after
        bare = {k: max(v) for k, v in rounds.items()}  # each call's fastest round
        gflop = get_spec(backbone).gflops_224 * (args.image_size / 224) ** 2
        best = max(bare.values())
        # the call the job runs (extract.jit_compile: auto, on this machine's devices)
        job_call = ("xla" if use_xla("auto", get_spec(backbone).application, configure_devices())
                    else "tf_function")
        result["backbones"][backbone] = {
            "weights": "real" if weights != "none" else "random (same FLOPs)",
            "bare": bare, "bare_rounds": rounds, "bare_img_s": best, **pipe,
            "ratio": pipe["pipeline_img_s"] / best, "job_call": job_call,
            "ratio_same_call": pipe["pipeline_img_s"] / bare[job_call],
            # the job's steady rate is a mean over its minutes, not its best minute: the median
            # round of the same call is the like-for-like figure beside the fastest round
            "bare_median": {k: float(np.median(v)) for k, v in rounds.items()},
            "ratio_same_call_median": pipe["pipeline_img_s"] / float(np.median(rounds[job_call])),
            "model_efficiency": best * gflop / result["sgemm_gflops"],
        }
    first = result["backbones"][args.backbones[0]]
    result.update({k: first[k] for k in ("bare_img_s", "pipeline_img_s", "ratio",
                                         "model_efficiency")})
    result["decode_draft_speedup"] = result["decode_draft_img_s"] / result["decode_full_img_s"]

    print(f"sgemm: {result['sgemm_gflops']:.1f} GFLOP/s on {result['cpus']} cores")
    print(f"decode 600x450 -> {args.image_size}: draft {result['decode_draft_img_s']:.1f} img/s, "
          f"full {result['decode_full_img_s']:.1f} img/s ({result['decode_draft_speedup']:.2f}x)")
    print(f"{'backbone':<12}{'predict':>9}{'tf.func':>9}{'xla':>9}{'pipeline':>10}{'e2e':>8}"
          f"{'ratio':>8}{'same':>7}{'eff':>7}")
    for name, r in result["backbones"].items():
        b = r["bare"]
        print(f"{name:<12}{b['predict']:>9.2f}{b['tf_function']:>9.2f}{b['xla']:>9.2f}"
              f"{r['pipeline_img_s']:>10.2f}{r['pipeline_e2e_img_s']:>8.2f}{r['ratio']:>8.2f}"
              f"{r['ratio_same_call']:>7.2f}{r['model_efficiency']:>7.2f}")
        print(f"{'':<12}against the median round of the call the job runs: "
              f"{r['ratio_same_call_median']:.2f}")
        print(f"{'':<12}rounds: tf.function {r['bare_rounds']['tf_function']}, "
              f"xla {r['bare_rounds']['xla']} (the job runs {r['job_call']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
