"""What a GPU node needs to keep its GPU busy on the cluster config's extraction, measured on one.

Issue 21 asks how many vCPUs per GPU keep it busy. This benchmark measures both sides on the
machine it runs on, with the same dermray code the cluster job runs, and without Ray or
TensorFlow (a GPU machine with Keras 3 on JAX or PyTorch will do):

- ``pack`` (here, with ``../shared``): a sample of the real plan's views, whole decode batches
  taken at even steps through it (so the views of one image share a batch, as in the job), their
  real HAM10000 JPEGs (the 200x150 images, and for each image one of the 600x450 originals, the
  size the cluster reads from S3), and one decode batch's real outputs of the cluster config's
  networks (ImageNet weights), for the writing. It goes into one folder that the GPU machine
  takes along.
- ``cpu``: the CPU side per view. Decode and augmentation (``augment.decode_batch``, what the
  decode tasks run) of the sample, and the writing of the config's outputs
  (``embeddings.write_batch``, what the actor calls), first in one process, then in P processes
  at once: a
  vCPU's rate when all of them are busy (hyper-threads share a core).
- ``gpu``: the GPU side. ``FrozenExtractor`` with the config's backbones (one ResNet50 pass for
  its four outputs with the two float16 maps copied back to the host, and VGG19), random weights
  (the rate does not depend on their values), at batch sizes, in float32 and mixed precision:
  views/s of the embedding actor's call, and the CPU time of the process per view.
- ``encode``: where the writing goes, per output (Parquet with the job's options, and
  uncompressed), and the largest output written by 1 and 2 threads at once.
- ``report``: vCPUs per GPU = the GPU's views/s x the CPU seconds per view at full load.

``pack`` needs ``../shared``; the other commands need only the pack (``--data``), so the pack is
made here and taken along to the GPU machine:

    python benchmarks/gpu_node.py pack --dest .devdata
    python benchmarks/gpu_node.py cpu --data .devdata --json out/gpu_node_cpu.json
    python benchmarks/gpu_node.py encode --data .devdata --json out/gpu_node_encode.json
    KERAS_BACKEND=jax python benchmarks/gpu_node.py gpu --data .devdata --json out/gpu_node_gpu.json
    python benchmarks/gpu_node.py report out/gpu_node_cpu.json out/gpu_node_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from extract_breakdown import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLAN_CONFIG = str(REPO / "ray_jobs/configs/ham10000_local.yaml")  # its data: the 200x150 images
NODE_CONFIG = str(REPO / "ray_jobs/configs/ham10000_cluster.yaml")  # its extract: what a node runs
ORIGINALS = str(REPO.parent / "shared/data/ham10000/originals_600x450")
WEIGHTS = str(REPO.parent / "shared/weights")
IMAGE_SETS = ("path", "path_original")  # the plan's columns: 200x150, 600x450


def even_batches(plan: pd.DataFrame, views: int, batch: int) -> pd.DataFrame:
    """``views`` rows of the plan as whole batches of ``batch`` at even steps through it (the
    plan is sorted by split and image, so the views of one image stay in one batch)."""
    n = max(1, min(views, len(plan)) // batch)
    starts = np.linspace(0, max(0, len(plan) - batch), n).astype(int)
    return pd.concat([plan.iloc[s:s + batch] for s in starts], ignore_index=True)


def pack(dest: str, views: int, plan_config: str, node_config: str, originals: str,
         weights_dir: str | None = WEIGHTS) -> dict:
    """The sample, its JPEGs and one batch's real outputs, in ``dest`` (the outputs of random
    weights where ``weights_dir`` is None)."""
    from dermray.config import load_all
    from dermray.data.augment import decode_batch, plan_views
    from dermray.data.catalog import build_catalog, build_manifest
    from dermray.models.backbones import FrozenExtractor, get_spec
    from dermray.stages.extract import PLAN_COLUMNS

    out = Path(dest).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) \
            and not (out / "meta.json").is_file():
        raise SystemExit(f"{out} exists and is not a pack (no meta.json): pass an empty or new "
                         "folder as --dest; a pack is replaced whole.")
    big = sorted(Path(originals).resolve().glob("*.jpg"))
    if not big:
        raise SystemExit(f"No 600x450 originals (*.jpg) in {originals}: pass --originals.")
    weights_dir = str(Path(weights_dir).resolve()) if weights_dir else None
    plan_config, node_config = str(Path(plan_config).resolve()), str(Path(node_config).resolve())
    # the configs' relative paths (../shared/...) are relative to the repository
    with contextlib.chdir(REPO):
        data = load_all(plan_config)["data"]
        node = load_all(node_config)["extract"]
        manifest = build_manifest(build_catalog(data.metadata, list(data.images)),
                                  (data.train_frac, data.val_frac, data.test_frac),
                                  seed=data.seed)
        plan = plan_views(manifest, augment=node.augment, target_per_class=node.target_per_class,
                          max_views_per_image=node.max_views_per_image,
                          tta_views=node.tta_views, seed=node.seed)[PLAN_COLUMNS]
        plan["path"] = [str(Path(p).resolve()) for p in plan["path"]]
    sample = even_batches(plan, views, node.decode_batch_size)
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    (out / "originals").mkdir()
    small, large = [], []
    for image_id, path in zip(sample["image_id"], sample["path"]):
        name = Path(path).name
        if not (out / "images" / name).exists():
            shutil.copyfile(path, out / "images" / name)
        small.append(f"images/{name}")
        # one of the originals for each image, the same for all its views
        original = big[zlib.crc32(str(image_id).encode()) % len(big)]
        if not (out / "originals" / original.name).exists():
            shutil.copyfile(original, out / "originals" / original.name)
        large.append(f"originals/{original.name}")
    sample = sample.assign(path=small, path_original=large)
    sample.to_parquet(out / "plan.parquet", index=False)
    # one decode batch's outputs of the node's networks (the real weights where given): what
    # the actor writes, with real activations' compressibility
    first = {c: sample[c].to_numpy()[:node.decode_batch_size] for c in sample.columns}
    first["path"] = np.asarray([str(out / p) for p in first["path"]], dtype=object)
    decoded = decode_batch(first, node.image_size, node.seed)
    # the networks' ImageNet files (Keras' own names)
    weights = {b: str(Path(weights_dir) / Path(get_spec(b).imagenet_url).name)
               if weights_dir else "none" for b in node.backbones}
    extractor = FrozenExtractor(node.backbones, weights, node.image_size,
                                node.decode_batch_size, jit_compile=node.jit_compile,
                                seed=node.seed)
    embedded = extractor.embed_rows(decoded["image"], {b: np.ones(len(decoded["image"]), bool)
                                                       for b in node.backbones})
    # the maps stored as float16, as they are written; the CPU side hands them over as the
    # extractor does for the node's precision (actor_outputs)
    np.savez(out / "outputs.npz", **{b: e.astype(np.float16 if get_spec(b).is_map else np.float32)
                                     for b, e in embedded.items()})
    meta = {"plan_config": plan_config, "node_config": node_config, "plan_views": len(plan),
            "views": len(sample), "images": int(sample["path"].nunique()),
            "originals": int(sample["path_original"].nunique()),
            "augmented_share": float((sample["aug_index"] > 0).mean()),
            "backbones": list(node.backbones), "image_size": node.image_size,
            "batch_size": node.batch_size, "decode_batch_size": node.decode_batch_size,
            "mixed_precision": node.mixed_precision, "seed": node.seed, "weights": weights}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {len(sample)} views of {meta['images']} images ({meta['originals']} "
          f"originals) and {len(decoded['image'])} views' outputs into {out}: {size / 1e6:.1f} MB")
    return meta


def actor_outputs(data: str, meta: dict) -> dict[str, np.ndarray]:
    """The pack's outputs as ``FrozenExtractor.embed_rows`` hands them to the writing: vectors
    float32; maps float16 under mixed precision (the network's own dtype), else float32 (to_table
    casts them)."""
    half = meta["mixed_precision"]
    return {name: emb.astype(np.float16 if half and emb.dtype == np.float16 else np.float32)
            for name, emb in np.load(Path(data) / "outputs.npz").items()}


def load(data: str) -> tuple[dict, pd.DataFrame]:
    folder = Path(data)
    meta = json.loads((folder / "meta.json").read_text())
    plan = pd.read_parquet(folder / "plan.parquet")
    for column in IMAGE_SETS:
        plan[column] = [str(folder / p) for p in plan[column]]
    return meta, plan


def _cpu_worker(task: tuple) -> dict:
    """Decode ``views`` views of the sample (0: all of them, so that each process does the
    sample's mix of splits and augmentations), from ``offset`` and wrapping round, in decode
    batches as the decode tasks do, and write them in the actor's batches with ``write_batch``
    (``views`` is rounded up to whole actor batches). Each pass over the sample writes
    into its own folder, so that every file written is a new one."""
    from dermray.data.augment import decode_batch
    from dermray.io import storage
    from dermray.models.embeddings import write_batch

    data, column, views, offset, out = task
    meta, plan = load(data)
    views = views or len(plan)
    size, each, batch = meta["image_size"], meta["decode_batch_size"], meta["batch_size"]
    # the actor's outputs as the extractor hands them over, cycled over a batch's rows, made
    # once here and not in the timed writing
    outputs = {f"emb_{name}": np.resize(emb, (batch, emb.shape[1]))
               for name, emb in actor_outputs(data, meta).items()}
    backbones = [name.removeprefix("emb_") for name in outputs]
    where = {"actor_id": np.full(batch, "bench", object), "node_id": np.full(batch, "local", object),
             "gpu_ids": np.full(batch, "", object), "error": np.full(batch, "", object)}
    cpu = {"decode_augment": 0.0, "write": 0.0}
    done = files = 0
    start_wall = time.perf_counter()
    for k in range(-(-views // batch)):
        first = offset + k * batch
        rows = plan.iloc[(first + np.arange(batch)) % len(plan)].reset_index(drop=True)
        t0 = time.process_time()
        for i in range(0, batch, each):
            columns = {c: rows[c].to_numpy()[i:i + each] for c in rows.columns}
            columns["path"] = columns[column]
            decoded = decode_batch(columns, size, meta["seed"])
            if any(decoded["error"]):
                raise SystemExit(f"decode failed: {[e for e in decoded['error'] if e][:2]}")
        t1 = time.process_time()
        # what the actor's call hands write_batch: the rows, no errors, the outputs, where
        written = write_batch({**{c: rows[c].to_numpy() for c in rows.columns}, **where,
                               **outputs}, storage.join(out, f"pass{first // len(plan)}"),
                              backbones)
        files += int((written["kind"] == "embeddings").sum())
        cpu["decode_augment"] += t1 - t0
        cpu["write"] += time.process_time() - t1
        done += batch
    return {"views": done, "files": files, "wall_s": time.perf_counter() - start_wall,
            "cpu_s": cpu}


def cpu_side(data: str, procs: list[int], views: int, json_path: str) -> dict:
    """Each image set at each process count: the views/s of all processes together and each
    step's CPU ms per view (saved after each, so that a run cut off keeps what it measured)."""
    meta = load(data)[0]
    result = {"meta": meta, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "runs": []}
    ctx = multiprocessing.get_context("spawn")  # no threads or libraries inherited
    for column in IMAGE_SETS:
        for p in procs:
            with tempfile.TemporaryDirectory(prefix="gpu_node_cpu_") as tmp, \
                    ctx.Pool(p) as pool:
                pool.map(_warm, range(p))  # imports done before the clock starts
                # the processes start at even steps through the sample (whole decode
                # batches), not all on the same files
                step = meta["views"] // p // meta["decode_batch_size"] * meta["decode_batch_size"]
                tasks = [(data, column, views, k * step, str(Path(tmp) / f"p{k}"))
                         for k in range(p)]
                start = time.perf_counter()
                parts = pool.map(_cpu_worker, tasks)
                wall = time.perf_counter() - start
                files = sum(1 for f in Path(tmp).rglob("*.parquet"))
            n = sum(r["views"] for r in parts)
            # each process's clock starts after its own loading: the slowest one's wall
            slowest = max(r["wall_s"] for r in parts)
            run = {"images": "600x450" if column == "path_original" else "200x150",
                   "processes": p, "views": n, "wall_s": slowest, "views_s": n / slowest,
                   "wall_with_loading_s": wall,
                   "files_written": files, "files_expected": sum(r["files"] for r in parts)}
            for step in ("decode_augment", "write"):
                run[f"{step}_cpu_ms_per_view"] = 1000 * sum(r["cpu_s"][step] for r in parts) / n
            run["cpu_ms_per_view"] = run["decode_augment_cpu_ms_per_view"] + run[
                "write_cpu_ms_per_view"]
            result["runs"].append(run)
            print(f"{run['images']} x {p} processes: {n} views in {slowest:.1f} s = "
                  f"{run['views_s']:.1f} views/s; CPU per view: decode+augment "
                  f"{run['decode_augment_cpu_ms_per_view']:.2f} ms, write "
                  f"{run['write_cpu_ms_per_view']:.2f} ms", flush=True)
            save(result, json_path)
    return result


def encode_side(data: str, rounds: int, threads: list[int]) -> dict:
    """Where the writing goes: each output of one batch (the pack's real rows) through
    ``to_table`` (from float32, and for a map also from float16, as a mixed-precision network
    hands it over) and Parquet into memory, with the job's options and without compression, the
    fastest of ``rounds``; then the largest output written
    by 1, 2, ... threads at once (rounds in turn): whether an actor's call threads write in
    parallel (pyarrow releases the GIL while it encodes)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from dermray.models.embeddings import parquet_options, to_table

    meta, plan = load(data)
    stored = dict(np.load(Path(data) / "outputs.npz"))
    outputs = {name: emb.astype(np.float32) for name, emb in stored.items()}
    # the maps as a mixed-precision network hands them over
    halves = {name: emb for name, emb in stored.items() if emb.dtype == np.float16}
    rows = plan.iloc[:len(next(iter(outputs.values())))].reset_index(drop=True)
    result = {"meta": meta, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "rows": len(rows),
              "outputs": {}, "threads": {}}

    def encode(table, **options) -> int:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        return buffer.tell()

    for name, emb in outputs.items():
        best = {"to_table": np.inf, "default": np.inf, "uncompressed": np.inf}
        if name in halves:
            best["to_table_from_float16"] = np.inf
        for _ in range(rounds):
            start = time.perf_counter()
            table = to_table(rows, emb, name)
            best["to_table"] = min(best["to_table"], time.perf_counter() - start)
            if name in halves:
                start = time.perf_counter()
                to_table(rows, halves[name], name)
                best["to_table_from_float16"] = min(best["to_table_from_float16"],
                                                    time.perf_counter() - start)
            for label, extra in (("default", {}), ("uncompressed", {"compression": "none"})):
                start = time.perf_counter()
                size = encode(table, **parquet_options(table), **extra)
                best[label] = min(best[label], time.perf_counter() - start)
                best[f"{label}_bytes"] = size
        result["outputs"][name] = {
            "values_per_view": int(emb.shape[1]), "zeros": float((emb == 0).mean()),
            **{f"{k}_ms_per_view": 1000 * best[k] / len(rows)
               for k in ("to_table", "to_table_from_float16", "default", "uncompressed")
               if k in best},
            **{f"{k}_kb_per_view": best[f"{k}_bytes"] / len(rows) / 1000
               for k in ("default", "uncompressed")}}
        r = result["outputs"][name]
        half = (f" (from float16 {r['to_table_from_float16_ms_per_view']:.2f} ms)"
                if name in halves else "")
        print(f"{name}: {r['values_per_view']} values a view ({r['zeros']:.0%} zeros); to_table "
              f"{r['to_table_ms_per_view']:.2f} ms{half}, Parquet "
              f"{r['default_ms_per_view']:.2f} ms "
              f"({r['default_kb_per_view']:.0f} KB), uncompressed "
              f"{r['uncompressed_ms_per_view']:.2f} ms ({r['uncompressed_kb_per_view']:.0f} KB) "
              "a view", flush=True)
    largest = max(outputs, key=lambda n: outputs[n].shape[1])
    table = to_table(rows, outputs[largest], largest)
    options = parquet_options(table)
    per_thread = 8  # encodings each thread does per round
    rates: dict[int, list[float]] = {n: [] for n in threads}
    for _ in range(rounds):
        for n in threads:
            with ThreadPoolExecutor(n) as pool:
                start = time.perf_counter()
                list(pool.map(lambda _: [encode(table, **options) for _ in range(per_thread)],
                              range(n)))
                rates[n].append(n * per_thread * len(rows) / (time.perf_counter() - start))
    result["threads"] = {"output": largest, "views_s": {str(n): v for n, v in rates.items()},
                         "mean_views_s": {str(n): float(np.mean(v)) for n, v in rates.items()}}
    base = float(np.mean(rates[threads[0]]))
    for n in threads:
        print(f"{largest} written by {n} thread(s) at once: {np.mean(rates[n]):.0f} views/s "
              f"(mean of {rounds}), {np.mean(rates[n]) / base:.2f}x", flush=True)
    return result


def _warm(_: int) -> None:
    for module in ("dermray.data.augment", "dermray.models.embeddings", "dermray.io.storage"):
        importlib.import_module(module)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def gpu_side(data: str, batch_sizes: list[int], precisions: list[str], seconds: float,
             networks: list[str], json_path: str) -> dict:
    """The embedding actor's call (``FrozenExtractor.embed_rows``) on real decoded views, each
    setting in turn (saved after each).

    On TensorFlow the call preprocesses in its graph (on the GPU); on other backends
    ``compile_forward`` runs the caffe preprocessing in NumPy on the host first, so the process
    CPU per view there includes it: ``host_preprocess_cpu_ms_per_view`` is that part, timed
    alone, which ``report`` takes out (the TensorFlow actor does not pay it)."""
    import keras

    from dermray.data.augment import decode_batch
    from dermray.models.backbones import FrozenExtractor, caffe_preprocess, get_spec

    meta, plan = load(data)
    columns = {c: plan[c].to_numpy() for c in plan.columns}
    images = decode_batch(columns, meta["image_size"], meta["seed"])["image"]
    groups = {"resnet50": [b for b in meta["backbones"] if get_spec(b).application == "ResNet50"],
              "vgg19": [b for b in meta["backbones"] if get_spec(b).application == "VGG19"]}
    groups["both"] = groups["resnet50"] + groups["vgg19"]
    backend = keras.backend.backend()
    host = 0.0
    if backend != "tensorflow":
        cpu0 = time.process_time()
        for _ in range(3):
            caffe_preprocess(images)
        host = 1000 * (time.process_time() - cpu0) / (3 * len(images))
    result = {"meta": meta, "backend": backend, "devices": devices(), "cpus": os.cpu_count(),
              "cpu_model": cpu_model(), "host_preprocess_cpu_ms_per_view_per_network": host,
              "runs": []}
    for precision in precisions:
        for network in networks:
            backbones = groups[network]
            for bs in batch_sizes:
                # before each build: clear_session resets Keras' global policy
                keras.mixed_precision.set_global_policy(precision)
                start = time.perf_counter()
                ext = FrozenExtractor(backbones, {b: "none" for b in backbones},
                                      meta["image_size"], bs, jit_compile="auto",
                                      mixed_precision=precision == "mixed_float16",
                                      seed=meta["seed"])
                build = time.perf_counter() - start
                policy = keras.mixed_precision.global_policy().name
                chunks = [images[(k * bs + np.arange(bs)) % len(images)]
                          for k in range(-(-len(images) // bs))]
                need = {b: np.ones(bs, bool) for b in backbones}
                start = time.perf_counter()
                ext.embed_rows(chunks[0], need)  # compiles
                first = time.perf_counter() - start
                calls = 0
                cpu0, start = time.process_time(), time.perf_counter()
                while calls < 5 or time.perf_counter() - start < seconds:
                    out = ext.embed_rows(chunks[calls % len(chunks)], need)
                    calls += 1
                wall = time.perf_counter() - start
                cpu = time.process_time() - cpu0
                run = {"network": network, "backbones": backbones, "precision": precision,
                       "policy": policy, "batch_size": bs, "build_s": build,
                       "first_call_s": first, "views": calls * bs, "wall_s": wall,
                       "views_s": calls * bs / wall,
                       "process_cpu_ms_per_view": 1000 * cpu / (calls * bs),
                       # the NumPy preprocessing ahead of each network's call (not TensorFlow)
                       "host_preprocess_cpu_ms_per_view": host * len(ext.networks),
                       # the outputs as the actor holds them on the host (float32 each)
                       "host_output_bytes_per_view": sum(o[0].nbytes for o in out.values())}
                result["runs"].append(run)
                print(f"{network} {policy} batch {bs}: {run['views_s']:.0f} views/s "
                      f"({calls} calls, {wall:.1f} s; first call {first:.1f} s); process CPU "
                      f"{run['process_cpu_ms_per_view']:.2f} ms/view", flush=True)
                save(result, json_path)
                del ext, out
                keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    return result


def devices() -> list[str]:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    if keras.backend.backend() == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices()]


def report(cpu: dict, gpu: dict, network: str = "both", batch_size: int = 0,
           precision: str = "") -> dict:
    """vCPUs per GPU: the GPU's views/s (the config's batch and precision by default) times the
    CPU seconds per view at the largest process count (all vCPUs busy, where it is at least the
    machine's vCPU count: ``all_vcpus_busy``), per image set; runs repeated at that count are
    averaged.

    The decode tasks need ``decode_augment``. The actor that feeds the GPU needs its own process
    CPU (the call's host side, measured with the GPU process alone, less the NumPy
    preprocessing that the TensorFlow actor runs on the GPU instead) and the writing (measured
    at full load)."""
    meta = gpu["meta"]
    bs = batch_size or meta["batch_size"]
    prec = precision or ("mixed_float16" if meta["mixed_precision"] else "float32")
    runs = [r for r in gpu["runs"] if r["network"] == network and r["batch_size"] == bs
            and r["precision"] == prec]
    if not runs:
        raise SystemExit(f"No GPU run of {network} at batch {bs} in {prec}.")
    g = runs[0]
    call_ms = g["process_cpu_ms_per_view"] - g.get("host_preprocess_cpu_ms_per_view", 0.0)
    most = max(r["processes"] for r in cpu["runs"])
    answer = {"network": network, "batch_size": bs, "precision": prec,
              "gpu_views_s": g["views_s"], "actor_call_cpu_ms_per_view": call_ms,
              "processes": most, "all_vcpus_busy": most >= cpu.get("cpus", most),
              "by_images": {}}
    for images in dict.fromkeys(r["images"] for r in cpu["runs"]):
        same = [r for r in cpu["runs"] if r["images"] == images and r["processes"] == most]
        decode_ms = float(np.mean([r["decode_augment_cpu_ms_per_view"] for r in same]))
        write_ms = float(np.mean([r["write_cpu_ms_per_view"] for r in same]))
        # CPU time per view with every vCPU busy (hyper-threads share cores), times the views
        # per second the GPU takes
        decode = g["views_s"] * decode_ms / 1000
        actor = g["views_s"] * (call_ms + write_ms) / 1000
        answer["by_images"][images] = {
            "runs_averaged": len(same), "decode_augment_cpu_ms_per_view": decode_ms,
            "write_cpu_ms_per_view": write_ms, "decode_augment_vcpus": decode,
            "actor_vcpus": actor, "vcpus_per_gpu": decode + actor,
            "write_share_of_actor": g["views_s"] * write_ms / 1000 / actor}
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--dest", default=".devdata")
    p.add_argument("--views", type=int, default=512)
    p.add_argument("--plan-config", default=PLAN_CONFIG)
    p.add_argument("--node-config", default=NODE_CONFIG)
    p.add_argument("--originals", default=ORIGINALS)
    p.add_argument("--weights-dir", default=WEIGHTS,
                   help="the networks' ImageNet .h5 files ('none': random weights)")
    c = sub.add_parser("cpu")
    c.add_argument("--data", default=".devdata")
    c.add_argument("--procs", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    c.add_argument("--views", type=int, default=0,
                   help="views per process (0: the whole sample)")
    c.add_argument("--json", default="out/gpu_node_cpu.json")
    g = sub.add_parser("gpu")
    g.add_argument("--data", default=".devdata")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32])
    g.add_argument("--precisions", nargs="+", default=["mixed_float16", "float32"],
                   choices=["float32", "mixed_float16", "mixed_bfloat16"])
    g.add_argument("--networks", nargs="+", default=["both"],
                   help="resnet50 (its four outputs), vgg19, or both (the config's actor)")
    g.add_argument("--seconds", type=float, default=5.0, help="timed per setting")
    g.add_argument("--json", default="out/gpu_node_gpu.json")
    e = sub.add_parser("encode")
    e.add_argument("--data", default=".devdata")
    e.add_argument("--rounds", type=int, default=5)
    e.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    e.add_argument("--json", default="out/gpu_node_encode.json")
    r = sub.add_parser("report")
    r.add_argument("cpu_json")
    r.add_argument("gpu_json")
    r.add_argument("--network", default="both")
    r.add_argument("--batch-size", type=int, default=0)
    r.add_argument("--precision", default="")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "pack":
        pack(args.dest, args.views, args.plan_config, args.node_config, args.originals,
             None if args.weights_dir.lower() == "none" else args.weights_dir)
    elif args.command == "cpu":
        cpu_side(args.data, args.procs, args.views, args.json)
    elif args.command == "gpu":
        gpu_side(args.data, args.batch_sizes, args.precisions, args.seconds, args.networks,
                 args.json)
    elif args.command == "encode":
        save(encode_side(args.data, args.rounds, args.threads), args.json)
    else:
        answer = report(json.loads(Path(args.cpu_json).read_text()),
                        json.loads(Path(args.gpu_json).read_text()), args.network,
                        args.batch_size, args.precision)
        print(json.dumps(answer, indent=2))


if __name__ == "__main__":
    main()
