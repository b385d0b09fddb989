"""Where the real config's extraction spends its time, step by step, on real views.

The real config (``ray_jobs/configs/ham10000_local.yaml`` by default) plans its views (originals
and class-balancing views); a random sample of ``--views`` of them is run through each step of the
extraction, one step at a time in this process, with the same code the job runs:

- decode + augment (``augment.decode_batch``), batches of ``extract.decode_batch_size``;
- the object store: ``ray.put`` + ``ray.get`` of each decoded batch (what a decode task hands the
  embedding actor when they are not fused), and of the actor's output when the driver writes;
- preprocessing (caffe) and the forward pass of the multi-output network (the direct call;
  global pooling is inside the network), batches of ``extract.batch_size``. Since the
  preprocessing runs inside the extractor's compiled call, its row is that call's time less the
  network's alone (``preprocess_numpy_reference``: what NumPy took for it, as before);
- the rest of ``FrozenExtractor.embed_rows`` (slicing, padding, copies into the outputs);
- ``write_batch``: conversion to Arrow (``embeddings.to_table``), Parquet encoding and
  compression (into memory), and the file writes;
- the reconcile and fingerprint steps at the end (``reconcile``, ``consolidate_quarantine``,
  ``claim``);
- start-up: ``ray.init``, the model build, and the first (compiling) call.

Each step is reported in seconds per 1,000 views. Then the same views go through the real job
(``run_extract`` on a local Ray, fresh folder), and its rate with start-up and writing included,
and its steady-state rate, are compared with the direct call's rate (the ratio the issue asks
for: the job at the model's speed).

With ``--calls-per-actor 1 2`` (instead of the breakdown) the job runs once per value on the
same views (fresh folders, in turn, ``--job-rounds`` times): 1 is each batch's decode, network
pass and writing one after another in the actor; 2 lets one batch decode and write while the
network embeds another (``extract.calls_per_actor``). It reports each one's rates, their ratio,
and whether the rows written are the same bits.

    python benchmarks/extract_breakdown.py --views 320 --json out/bench_breakdown.json
    python benchmarks/extract_breakdown.py --views 1024 --calls-per-actor 1 2 \
        --job-rounds 2 --json out/bench_overlap.json
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PER = 1000.0  # figures are per 1,000 views


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def fastest(rounds: int, *steps) -> list[float]:
    """Seconds of each step, the steps timed in turn ``rounds`` times and the fastest round of
    each kept: this VM's speed drifts from minute to minute by more than the preprocessing
    costs, and one timing each would compare two different minutes."""
    best = [float("inf")] * len(steps)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            best[i] = min(best[i], timed(step)[1])
    return best


def plan_sample(config: str, views: int, seed: int = 0):
    """The config's extract section and a random sample of its planned views (all splits)."""
    from dermray.config import load_all
    from dermray.data.augment import plan_views
    from dermray.data.catalog import build_catalog, build_manifest
    from dermray.stages.extract import PLAN_COLUMNS

    os.chdir(REPO)  # the config's relative paths (../shared/...) are relative to the repo
    sections = load_all(config)
    data, ext = sections["data"], sections["extract"]
    catalog = build_catalog(data.metadata, list(data.images))
    manifest = build_manifest(catalog, (data.train_frac, data.val_frac, data.test_frac),
                              seed=data.seed)
    plan = plan_views(manifest, augment=ext.augment, target_per_class=ext.target_per_class,
                      max_views_per_image=ext.max_views_per_image, tta_views=ext.tta_views,
                      seed=ext.seed)[PLAN_COLUMNS]
    sample = plan.sample(n=min(views, len(plan)), random_state=seed)
    return ext, manifest, plan, sample.reset_index(drop=True)


def breakdown(ext, sample: pd.DataFrame, out: str, rounds: int = 3) -> dict[str, float]:
    """Seconds of each step over the sample's views (not yet per 1,000)."""
    import ray

    from dermray.data.augment import decode_batch
    from dermray.io.fingerprint import claim, make
    from dermray.models.backbones import FrozenExtractor, build_network, compile_forward, preprocess
    from dermray.models.embeddings import backbone_dir, content_name, to_table
    from dermray.stages.extract import consolidate_quarantine, reconcile, write_batch

    s: dict[str, float] = {}
    backbones = list(ext.backbones)
    weights = {b: ext.weights_for(b) for b in backbones}
    extractor, s["startup_model_build"] = timed(
        FrozenExtractor, backbones, weights, ext.image_size, ext.batch_size,
        jit_compile=ext.jit_compile, mixed_precision=ext.mixed_precision, seed=ext.seed)
    rows = {c: sample[c].to_numpy() for c in sample.columns}
    decoded = []
    start = time.perf_counter()
    for i in range(0, len(sample), ext.decode_batch_size):
        batch = {c: v[i:i + ext.decode_batch_size] for c, v in rows.items()}
        decoded.append(decode_batch(batch, ext.image_size, ext.seed))
    s["decode_augment"] = time.perf_counter() - start
    images = np.concatenate([d["image"] for d in decoded])
    merged = {c: np.concatenate([d[c] for d in decoded]) for c in decoded[0]}
    for b in backbones:
        merged[f"need_{b}"] = np.ones(len(images), bool)
    chunks = [images[i:i + ext.batch_size] for i in range(0, len(images), ext.batch_size)]
    # the first call compiles (XLA): start-up, not forward
    names, forward = extractor.networks[0]
    mode = extractor.preprocessing[names[0]]
    # since issue 21's second round the extractor's call takes uint8 images and preprocesses
    # them in its compiled graph; before, the NumPy preprocessing ran ahead of it
    in_graph = "preprocessing" in inspect.signature(compile_forward).parameters
    padded = [np.concatenate([c, np.zeros((ext.batch_size - len(c), *c.shape[1:]), c.dtype)])
              if len(c) < ext.batch_size else c for c in chunks]
    numpy_step = lambda: [preprocess(names[0], c, mode) for c in padded]
    prepped = numpy_step()
    if in_graph:
        _, s["startup_first_call"] = timed(forward, padded[0])
        # the network alone (the direct call the job is compared with): its own compiled call
        # on the preprocessed input, built apart (not counted in start-up)
        network = compile_forward(build_network(names, weights[names[0]], ext.image_size),
                                  jit_compile=ext.jit_compile)
        network(prepped[0])
        s["forward_direct"], with_preprocessing, s["preprocess_numpy_reference"] = fastest(
            rounds, lambda: [network(x) for x in prepped], lambda: [forward(x) for x in padded],
            numpy_step)
        # the preprocessing's cost inside the call: the call less the network alone (NumPy's,
        # the reference, is what it cost before)
        s["preprocess"] = max(0.0, with_preprocessing - s["forward_direct"])
        outputs = [forward(x) for x in padded]
    else:
        _, s["startup_first_call"] = timed(forward, prepped[0])
        s["preprocess"], s["forward_direct"] = fastest(
            rounds, numpy_step, lambda: [forward(x) for x in prepped])
        outputs = [forward(x) for x in prepped]
    # embed_rows around the network: the same calls with the network's outputs replayed, so
    # that what is timed is the (NumPy) preprocessing, padding, slicing and copies alone
    replay = iter(outputs * 2)
    extractor.networks[0] = (names, lambda x: next(replay))
    embedded = []
    start = time.perf_counter()
    for chunk in chunks:
        embedded.append(extractor.embed_rows(chunk, {b: np.ones(len(chunk), bool)
                                                     for b in backbones}))
    total = time.perf_counter() - start
    extractor.networks[0] = (names, forward)
    s["embed_rows_rest"] = max(0.0, total - (0.0 if in_graph else s["preprocess"]))
    # the writing path, as the actor runs it, and its parts
    batches = []
    for k, i in enumerate(range(0, len(images), ext.batch_size)):
        b = {c: v[i:i + ext.batch_size] for c, v in merged.items() if c != "image"}
        b.update({f"emb_{n}": e for n, e in embedded[k].items()})
        b.update({"actor_id": np.full(len(b["image_id"]), "bench", object),
                  "node_id": np.full(len(b["image_id"]), "local", object),
                  "gpu_ids": np.full(len(b["image_id"]), "", object)})
        batches.append(b)
    frames = [pd.DataFrame({k: v for k, v in b.items() if not k.startswith("emb_")})
              for b in batches]
    tables, s["arrow_conversion"] = timed(lambda: [
        to_table(f, b[f"emb_{n}"], n) for f, b in zip(frames, batches) for n in backbones])
    buffers, s["parquet_encode_compress"] = timed(lambda: [
        _encode(t) for t in tables])
    s["bytes_per_view"] = sum(len(x) for x in buffers) / len(images)
    # the job claims its folders (writes their fingerprints) before it writes a view
    _, t_c = timed(lambda: [claim(backbone_dir(out, n), "extract",
                                  make("extract", {"bench": True}, {"n": content_name(sample)},
                                       ()), False, root=out) for n in backbones])
    _, s["write_batch_total"] = timed(lambda: [write_batch(b, out, backbones) for b in batches])
    s["file_write_rest"] = max(0.0, s["write_batch_total"] - s["arrow_conversion"]
                               - s["parquet_encode_compress"])
    # end of the job: quarantine, reconcile
    quarantine, t_q = timed(consolidate_quarantine, out)
    _, t_r = timed(reconcile, sample, out, backbones, quarantine)
    s["reconcile_fingerprint"] = t_q + t_r + t_c
    # the object store: a decoded batch in, and (driver-writes layout) the embeddings back out
    _, s["startup_ray_init"] = timed(ray.init, address="local", num_cpus=os.cpu_count(),
                                     include_dashboard=False, log_to_driver=False)
    _, s["object_store_decoded"] = timed(lambda: [ray.get(ray.put(d)) for d in decoded])
    _, s["object_store_outputs"] = timed(lambda: [ray.get(ray.put(b)) for b in batches])
    ray.shutdown()
    s["views"] = len(images)
    return s


def _encode(table) -> bytes:
    try:  # as the job writes its part files (older trees: pyarrow's defaults)
        from dermray.models.embeddings import parquet_options
    except ImportError:
        def parquet_options(table):
            return {}

    sink = io.BytesIO()
    pq.write_table(table, sink, **parquet_options(table))  # as the job writes its part files
    return sink.getvalue()


def pipeline(ext, manifest: pd.DataFrame, sample: pd.DataFrame, out: str) -> dict[str, float]:
    """The real job on the sample's images, fresh folder: its own plan of those images."""
    import dataclasses

    import pyarrow.dataset as pads
    import ray

    from dermray.data.catalog import write_manifest
    from dermray.models.embeddings import backbone_dir
    from dermray.stages.extract import run_extract

    images = manifest[manifest["image_id"].isin(sample["image_id"])]
    write_manifest(images, out, {"benchmark": True})
    cfg = dataclasses.replace(ext, manifest=str(Path(out) / "manifest.parquet"), out=out)
    start = time.perf_counter()
    record = run_extract(cfg)
    wall = time.perf_counter() - start
    views = record["views_planned"]
    first = backbone_dir(out, ext.backbones[0])
    files = sorted(Path(first).rglob("*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [pads.dataset(str(f)).count_rows() for f in files]
    span = files[-1].stat().st_mtime - files[0].stat().st_mtime
    ray.shutdown()
    planned = record["views_planned"]
    return {"views": views, "images": len(images), "wall_s": wall, "e2e_views_s": views / wall,
            "augmented_share": 1 - len(images) / planned if planned else 0.0,
            "steady_views_s": (sum(rows) - rows[0]) / span if span > 0 else float("nan"),
            "calls_per_actor": getattr(ext, "calls_per_actor", 1)}


def written_rows(out: str, backbones) -> dict[str, pd.DataFrame]:
    """Each backbone's rows as written (every column), in (image_id, aug_index) order."""
    from dermray.models.embeddings import backbone_dir, dataset

    rows = {}
    for name in backbones:
        frame = dataset(backbone_dir(out, name)).to_table().to_pandas()
        keep = [c for c in frame.columns if c not in ("actor_id", "node_id", "gpu_ids")]
        rows[name] = frame[keep].sort_values(["image_id", "aug_index"]).reset_index(drop=True)
    return rows


def same_bits(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> bool:
    """Whether two jobs wrote the same rows: the same keys and every embedding bit for bit
    (pandas' exact frame comparison: NaN ages equal, array cells compared element by element)."""
    try:
        for name, left in a.items():
            pd.testing.assert_frame_equal(left, b[name], check_exact=True)
    except AssertionError:
        return False
    return True


def overlap(ext, manifest: pd.DataFrame, sample: pd.DataFrame, tmp: str, calls: list[int],
            rounds: int) -> dict[str, object]:
    """The job once per ``calls_per_actor`` value, in turn, ``rounds`` times; the best rate of
    each, the ratio of the last value's to the first's, and whether they wrote the same bits."""
    import dataclasses

    runs: dict[int, list[dict[str, float]]] = {c: [] for c in calls}
    rows = {}
    for r in range(rounds):
        for c in (calls if r % 2 == 0 else calls[::-1]):  # ABBA: the VM's drift hits both
            out = str(Path(tmp) / f"job_calls{c}_round{r}")
            runs[c].append(pipeline(dataclasses.replace(ext, calls_per_actor=c), manifest,
                                    sample, out))
            if c not in rows:  # one job's rows per value: the bits do not vary by round
                rows[c] = written_rows(out, ext.backbones)
            shutil.rmtree(out)
            print(f"calls_per_actor {c} (round {r + 1}): {runs[c][-1]['e2e_views_s']:.2f} "
                  f"views/s with start-up, {runs[c][-1]['steady_views_s']:.2f} steady",
                  flush=True)
    best = {c: {k: float(np.nanmax([run[k] for run in runs[c]]))
                for k in ("e2e_views_s", "steady_views_s")} for c in calls}
    first, last = calls[0], calls[-1]
    return {"runs": {str(c): v for c, v in runs.items()}, "best": {str(c): v for c, v in best.items()},
            "ratio_e2e": best[last]["e2e_views_s"] / best[first]["e2e_views_s"],
            "ratio_steady": best[last]["steady_views_s"] / best[first]["steady_views_s"],
            "same_bits": all(same_bits(rows[first], rows[c]) for c in calls)}


class _CountRows:
    """A stand-in embedding actor that only counts the rows of each batch Ray Data gives it."""

    def __call__(self, batch):
        return {"rows": np.asarray([len(batch["image_id"])])}


def batching(n_views: int, batch_size: int, decode_batch_size: int) -> dict[str, dict]:
    """The batches the embedding actor gets for a job of ``n_views`` views, through Ray Data's
    own batching (the job's decode -> actor chain, with a counting actor), for the blocks the
    job makes now (``raysession.batch_blocks``) and for the even repartition it made before. The
    actor pads a short batch to ``batch_size``: ``useful`` is the share of the network's work
    spent on real views."""
    import ray

    try:
        from dermray.stages.raysession import batch_blocks
    except ImportError:  # an older tree
        batch_blocks = None
    frame = pd.DataFrame({"image_id": [f"v{i}" for i in range(n_views)]})
    layouts = {"repartition (before)": lambda: ray.data.from_pandas(frame).repartition(
        max(1, min(n_views // max(decode_batch_size, 1), 200)))}
    if batch_blocks is not None:
        layouts["whole batches (now)"] = lambda: ray.data.from_pandas(
            batch_blocks(frame, batch_size))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    for name, make in layouts.items():
        ds = make().map_batches(lambda b: b, batch_size=decode_batch_size, num_cpus=1)
        ds = ds.map_batches(_CountRows, batch_size=batch_size, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
        sizes = [int(r) for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                 for r in b["rows"]]
        padded = sum(-(-s // batch_size) * batch_size for s in sizes)
        out[name] = {"batches": len(sizes), "full": sum(s == batch_size for s in sizes),
                     "views": sum(sizes), "computed": padded, "useful": sum(sizes) / padded}
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="ray_jobs/configs/ham10000_local.yaml")
    parser.add_argument("--views", type=int, default=320)
    parser.add_argument("--json", default="out/bench_breakdown.json")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timings of the forward pass (and preprocessing) taken in turn; "
                             "the fastest of each is kept")
    parser.add_argument("--calls-per-actor", type=int, nargs="+",
                        help="run the job once per value (extract.calls_per_actor), in turn")
    parser.add_argument("--job-rounds", type=int, default=1,
                        help="with --calls-per-actor: how many times each value runs")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ext, manifest, plan, sample = plan_sample(str(REPO / args.config), args.views)
    if args.calls_per_actor:
        with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
            result = {"config": args.config, "views": len(sample), "cpus": os.cpu_count(),
                      "load_avg_1m_at_start": os.getloadavg()[0],
                      **overlap(ext, manifest, sample, tmp, args.calls_per_actor,
                                args.job_rounds)}
        first, last = args.calls_per_actor[0], args.calls_per_actor[-1]
        print(f"calls_per_actor {last} against {first}, best of {args.job_rounds}: "
              f"{result['ratio_e2e']:.3f}x with start-up, {result['ratio_steady']:.3f}x steady; "
              f"same bits: {result['same_bits']}")
        save(result, args.json)
        return
    batches = batching(len(plan), ext.batch_size, ext.decode_batch_size)
    with tempfile.TemporaryDirectory(prefix="bench_breakdown_") as tmp:
        steps = breakdown(ext, sample, str(Path(tmp) / "steps"), args.rounds)
        n = steps.pop("views")
        per = {k: (v if k == "bytes_per_view" else v / n * PER) for k, v in steps.items()}
        result = {"config": args.config, "views": n, "backbones": list(ext.backbones),
                  "image_size": ext.image_size, "batch_size": ext.batch_size,
                  "cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
                  "augmented_share": float((sample["aug_index"] > 0).mean()),
                  "seconds_per_1000_views": per,
                  "direct_views_s": n / steps["forward_direct"],
                  "plan_views": len(plan), "batching": batches}
        if not args.no_pipeline:
            pipe = pipeline(ext, manifest, sample, str(Path(tmp) / "job"))
            result["pipeline"] = pipe
            result["ratio_e2e"] = pipe["e2e_views_s"] / result["direct_views_s"]
            result["ratio_steady"] = pipe["steady_views_s"] / result["direct_views_s"]
    print(f"{args.config}: {n} views ({result['augmented_share']:.0%} class-balancing), "
          f"{', '.join(ext.backbones)} at {ext.image_size} px, batch {ext.batch_size}")
    print(f"{'step':<28}{'s / 1,000 views':>16}")
    for k, v in per.items():
        if k not in ("bytes_per_view", "preprocess_numpy_reference"):  # steps that add up
            print(f"{k:<28}{v:>16.1f}")
    if "preprocess_numpy_reference" in per:
        print(f"(preprocess: the extractor's call less the network alone, the fastest of "
              f"{args.rounds} rounds of each; NumPy's preprocessing, before, took "
              f"{per['preprocess_numpy_reference']:.1f} s / 1,000 views)")
    print(f"Parquet bytes per view: {per['bytes_per_view']:,.0f}")
    print(f"direct call of the network: {result['direct_views_s']:.2f} views/s")
    for name, b in batches.items():
        print(f"the config's {len(plan)} views, {name}: {b['batches']} batches ({b['full']} "
              f"full), the network computes {b['computed']} views: {b['useful']:.3f} useful")
    if "pipeline" in result:
        p = result["pipeline"]
        print(f"the job: {p['views']} views in {p['wall_s']:.1f} s = {p['e2e_views_s']:.2f} "
              f"views/s with start-up (ratio {result['ratio_e2e']:.2f}); steady "
              f"{p['steady_views_s']:.2f} views/s (ratio {result['ratio_steady']:.2f})")
    save(result, args.json)


def save(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
