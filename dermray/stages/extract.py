"""The extraction job: manifest -> views -> decode+augment (CPU tasks) -> frozen backbones (actor
pool, one GPU per actor on a cluster) -> Parquet part files, with quarantine and resume.

The pure pieces live beside their data: ``augment.decode_batch`` (decode + augment a batch of
views) and ``backbones.FrozenExtractor`` (the models; one batch in, embeddings out). This module
is the Ray Data wiring: the ``Embedder`` actor around the extractor (with the crash point
``embed`` and the actor/node record), ``write_batch`` (part files and quarantine), resume and
reconciliation.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dermray.config import ExtractConfig, config_to_dict, output_settings
from dermray.data.augment import decode_batch, plan_views
from dermray.data.catalog import frame_hash, read_manifest
from dermray.errors import DermrayError
from dermray.io import faults, storage
from dermray.io.fingerprint import check_claim, claim, make, versions
from dermray.models.backbones import (
    FrozenExtractor,
    limit_threads,
    weights_hint,
    weights_identity,
    weights_name,
    weights_origin,
)
from dermray.models.embeddings import (  # write_batch: Ray-free, so benchmarks run it anywhere
    WHERE_COLUMNS,
    backbone_dir,
    dataset,
    quarantine_dir,
    read_keys,
    write_batch,
)
from dermray.stages.progress import ExtractProgress
from dermray.stages.raysession import (
    batch_blocks,
    check_resources,
    cluster_shape,
    ensure_ray,
    joined_cluster,
    pool_layout,
)

logger = logging.getLogger(__name__)

PLAN_COLUMNS = ["image_id", "lesion_id", "dx", "label", "split", "path", "age", "sex",
                "localization", "aug_index"]


class Embedder:
    """The Ray Data actor: a ``FrozenExtractor`` built once per actor, the crash point ``embed``,
    and the record of which actor on which node embedded each view; writes the part files itself
    when given ``out``.

    TensorFlow is imported here, inside the actor, after its thread count is set.

    An actor may run several calls at once (``extract.calls_per_actor``): the network runs one
    batch at a time (a lock), while another call decodes its images or writes its part files.
    Each batch is embedded alone, so the rows are the same bits either way.
    """

    def __init__(self, backbones: list[str], weights: dict[str, str], image_size: int,
                 batch_size: int, jit_compile: bool | str = "auto", threads: int = 0,
                 mixed_precision: bool = False, out: str | None = None, seed: int = 0) -> None:
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            limit_threads(threads)
        self.extractor = FrozenExtractor(backbones, weights, image_size, batch_size,
                                         jit_compile=jit_compile,
                                         mixed_precision=mixed_precision, seed=seed)
        self.backbones = list(backbones)
        self.out = out  # where to write part files; None: return the embeddings instead
        self.where = _where()
        self.network = threading.Lock()  # one batch in the network at a time

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        faults.point("embed")  # a crashed actor (tests): Ray restarts it and retries the batch
        ok = np.asarray([not e for e in batch["error"]])
        out = {k: v for k, v in batch.items() if k != "image"}
        needed = {name: ok & np.asarray(batch.get(f"need_{name}", np.ones(len(ok), bool)),
                                        dtype=bool)
                  for name in self.backbones}
        with self.network:
            embedded = self.extractor.embed_rows(batch["image"], needed)
        for name, emb in embedded.items():
            out[f"emb_{name}"] = emb
        for key, value in self.where.items():  # which actor on which node embedded each view
            out[key] = np.full(len(ok), value, dtype=object)
        if self.out is not None:
            # writing here (milliseconds per batch) keeps the embeddings out of the object store
            # and needs no CPU slot of its own, which a 2-core laptop does not have to spare
            return write_batch(out, self.out, self.backbones)
        return out


def _where() -> dict[str, str]:
    """This process's Ray actor id, node id and GPU ids ("local" outside an actor)."""
    where = {"actor_id": f"local-{os.getpid()}", "node_id": "local", "gpu_ids": ""}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            where = {"actor_id": ctx.get_actor_id() or where["actor_id"],
                     "node_id": ctx.get_node_id(),
                     "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}
    except Exception:
        logger.debug("no Ray runtime context", exc_info=True)
    return where


def done_keys(folder: str) -> set[tuple[str, int]]:
    """The (image_id, aug_index) views already written under a folder of part files."""
    keys = read_keys(folder)
    return set(zip(keys["image_id"], keys["aug_index"].astype(int)))


def pending_views(plan: pd.DataFrame, out: str, backbones: list[str]) -> pd.DataFrame:
    """The views still to do, with a ``need_<backbone>`` flag per backbone (resume)."""
    keys = list(zip(plan["image_id"], plan["aug_index"].astype(int)))
    quarantined = done_keys(quarantine_dir(out))
    pending = plan.copy()
    for name in backbones:
        done = done_keys(backbone_dir(out, name)) | quarantined
        pending[f"need_{name}"] = [k not in done for k in keys]
    need_any = pending[[f"need_{n}" for n in backbones]].any(axis=1)
    return pending[need_any].reset_index(drop=True)



def actor_layout(cfg: ExtractConfig) -> dict[str, Any]:
    """The embedding actor pool, with which resources, from the config and the cluster.

    On GPUs the pool autoscales between the actors that fit on the GPUs present now (at least
    one) and ``max_actors``. It asks for all ``max_actors`` at once (``initial_size``): their
    pending GPU demand is what makes the cluster autoscaler add GPU nodes in one round, and the
    actors that get a GPU start working without waiting for the others. (Growing from one actor
    instead, Ray Data asks for the next GPU only once it has throughput figures: measured on the
    fake multi-node cluster, a run of a few hundred views ended before a second node came.)
    """
    gpus, nodes = cluster_shape()
    if cfg.num_gpus_per_actor and not gpus and not joined_cluster():
        # nothing would ever bring a GPU: the actors would wait forever
        raise DermrayError(
            f"extract.num_gpus_per_actor is {cfg.num_gpus_per_actor} but this local Ray has no "
            "GPU and no autoscaler to add one. Set extract.num_gpus_per_actor: 0 to embed on "
            "the CPU, or submit the job to a GPU cluster (`ray job submit`, RAY_ADDRESS).")
    layout = pool_layout(gpus, nodes, os.cpu_count() or 1, cfg.num_actors, cfg.max_actors,
                         cfg.num_gpus_per_actor, cfg.threads_per_actor)
    if cfg.write_from != "auto":
        writer = cfg.write_from
    else:  # a local OUT on a multi-node cluster exists only on the head: the driver writes it
        writer = "driver" if nodes > 1 and not storage.is_remote(cfg.out) else "actors"
    return {**layout, "num_cpus": cfg.cpus_per_actor, "writer": writer}


def actor_requests(cfg: ExtractConfig, layout: dict[str, Any]
                   ) -> list[tuple[str, dict[str, float], str]]:
    """What one embedding actor and one decode task ask of a node (for
    ``raysession.check_resources``)."""
    auto = "" if cfg.num_gpus_per_actor else f" (auto: {layout['num_gpus']:g})"
    what = (f"An embedding actor (extract.cpus_per_actor: {cfg.cpus_per_actor:g}, "
            f"extract.num_gpus_per_actor: {cfg.num_gpus_per_actor:g}{auto})")
    return [(what,
             {"CPU": float(layout["num_cpus"]), "GPU": float(layout["num_gpus"])},
             "Lower extract.cpus_per_actor or extract.num_gpus_per_actor to what a node has."),
            ("A decode task (1 CPU)", {"CPU": 1.0}, "Give the cluster a node with a CPU.")]


def actor_summary(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Views embedded per actor (with its node and GPUs), from the batch summary rows."""
    if rows.empty:
        return []
    grouped = rows.groupby(list(WHERE_COLUMNS), as_index=False)["rows"].sum()
    return [{"actor_id": r.actor_id, "node_id": r.node_id, "gpu_ids": r.gpu_ids,
             "views": int(r.rows)} for r in grouped.itertuples()]


def _library_versions() -> dict[str, str]:

    return {"python": platform.python_version(),
            **versions(("ray", "keras", "tensorflow", "tensorflow-cpu", "numpy", "pyarrow",
                        "pillow"))}


def consolidate_quarantine(out: str) -> pd.DataFrame:
    """Gather the quarantine part files into ``OUT/quarantine.parquet`` (always written)."""
    ds = dataset(quarantine_dir(out))
    columns = ["image_id", "aug_index", "split", "path", "reason"]
    frame = ds.to_table(columns=columns).to_pandas() if ds else pd.DataFrame(columns=columns)
    frame = frame.drop_duplicates(["image_id", "aug_index"]).sort_values(["image_id", "aug_index"])

    storage.write_parquet(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False),
                          storage.join(out, "quarantine.parquet"))
    return frame


def reconcile(plan: pd.DataFrame, out: str, backbones: list[str],
              quarantine: pd.DataFrame) -> dict[str, Any]:
    """Check views planned = rows written + views quarantined, per backbone, no duplicates."""
    counts: dict[str, Any] = {}
    for name in backbones:
        ds = dataset(backbone_dir(out, name))
        frame = (ds.to_table(columns=["image_id", "aug_index", "split", "dx"]).to_pandas()
                 if ds else pd.DataFrame(columns=["image_id", "aug_index", "split", "dx"]))
        dups = int(frame.duplicated(["image_id", "aug_index"]).sum())
        if dups or len(frame) + len(quarantine) != len(plan):
            raise DermrayError(
                f"Counts do not reconcile for {name}: planned {len(plan)} views, written "
                f"{len(frame)} ({dups} duplicates), quarantined {len(quarantine)}. "
                + ("Redo the extraction with `dermray extract --fresh`." if dups else
                   "Rerun `dermray extract` to fill the gaps."))
        counts[name] = {
            "rows": len(frame),
            "per_split": {k: int(v) for k, v in frame["split"].value_counts().sort_index().items()},
            "per_class": {k: int(v) for k, v in frame["dx"].value_counts().sort_index().items()},
        }
    return counts


# the libraries whose versions change the numbers (decoding, resizing, the networks)
OUTPUT_PACKAGES = ("keras", "tensorflow", "tensorflow-cpu", "numpy", "pillow")


def output_claims(cfg: ExtractConfig, manifest: pd.DataFrame, identities: dict[str, str]
                  ) -> dict[str, dict[str, Any]]:
    """Folder -> the fingerprint that claims it: the quarantine, and each backbone's folder (the
    output of exactly these settings, this manifest and that backbone's weights)."""
    # the settings declared to change which views are made and what their rows hold (not the
    # Ray layout: dermray.config declares each field's effect)
    settings = output_settings(cfg)
    inputs = {"manifest": frame_hash(manifest)}
    claims = {quarantine_dir(cfg.out): make("extract", settings, inputs, OUTPUT_PACKAGES)}
    for name in cfg.backbones:
        claims[backbone_dir(cfg.out, name)] = make(
            "extract", {**settings, "backbone": name}, {**inputs, "weights": identities[name]},
            OUTPUT_PACKAGES)
    return claims


def claim_outputs(cfg: ExtractConfig, manifest: pd.DataFrame, identities: dict[str, str],
                  fresh: bool) -> None:
    """Each backbone's folder (and the quarantine) is the output of exactly these settings, this
    manifest and that backbone's weights: a rerun with anything else is refused, or with
    ``fresh`` starts that folder over (see dermray.io.fingerprint)."""
    for folder, current in output_claims(cfg, manifest, identities).items():
        claim(folder, "extract", current, fresh, root=cfg.out)


def check_outputs(cfg: ExtractConfig, fresh: bool = False) -> dict[str, str]:
    """What ``run_extract`` would refuse, refused now, with nothing written or deleted (a run
    checks every stage before the first starts Ray); returns backbone -> the fingerprint key
    its folder will hold."""
    if not cfg.manifest:
        raise DermrayError("extract.manifest is not set: pass --manifest OUT/manifest.parquet.")
    manifest = read_manifest(cfg.manifest)
    identities = {b: weights_identity(cfg.weights_for(b), b) for b in cfg.backbones}
    claims = output_claims(cfg, manifest, identities)
    for folder, current in claims.items():
        check_claim(folder, "extract", current, fresh, root=cfg.out)
    return {name: claims[backbone_dir(cfg.out, name)]["key"] for name in cfg.backbones}


def weights_record(weights: dict[str, str | None],
                   identities: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """What extract_run.json says of each backbone's weights (``weights``: backbone -> as
    configured): their identity (sha256 or 'none'), file name, the absolute path they were read
    at (a bundle's first place to look) and their origin (random, Keras' own ImageNet file, which
    predict may download, or the user's file, which it never downloads)."""
    identities = identities or {b: weights_identity(w, b) for b, w in weights.items()}
    hints = {b: weights_hint(w, b) for b, w in weights.items()}
    return {"weights": identities,
            "weights_names": {b: weights_name(w, b) for b, w in weights.items()},
            "weights_hints": hints,
            "weights_origins": {b: weights_origin(b, identities[b], hints[b]) for b in weights}}


def run_extract(cfg: ExtractConfig, fresh: bool = False) -> dict[str, Any]:
    """Plan, run the Ray Data job over the pending views, reconcile, write the run record."""
    import ray

    start = time.perf_counter()
    if not cfg.manifest:
        raise DermrayError("extract.manifest is not set: pass --manifest OUT/manifest.parquet.")
    manifest = read_manifest(cfg.manifest)
    plan = plan_views(manifest, augment=cfg.augment, target_per_class=cfg.target_per_class,
                      max_views_per_image=cfg.max_views_per_image, tta_views=cfg.tta_views,
                      seed=cfg.seed)[PLAN_COLUMNS]
    backbones = list(cfg.backbones)
    identities = {b: weights_identity(cfg.weights_for(b), b) for b in backbones}  # fails early
    claim_outputs(cfg, manifest, identities, fresh)
    pending = pending_views(plan, cfg.out, backbones)
    logger.info("extract: %d views planned, %d pending", len(plan), len(pending))
    files_written = 0
    layout: dict[str, Any] = {}
    actors: list[dict[str, Any]] = []
    if len(pending):
        ensure_ray()
        layout = actor_layout(cfg)
        check_resources(actor_requests(cfg, layout))  # never queued forever
        ds = ray.data.from_pandas(batch_blocks(pending, cfg.batch_size))
        ds = ds.map_batches(decode_batch, batch_size=cfg.decode_batch_size, num_cpus=1,
                            fn_kwargs={"image_size": cfg.image_size, "seed": cfg.seed})
        ds = ds.map_batches(
            Embedder, batch_size=cfg.batch_size, num_cpus=layout["num_cpus"],
            num_gpus=layout["num_gpus"] or None,
            # calls_per_actor > 1: the decode and the writing of one batch run beside the
            # network's pass over another (Embedder's lock keeps the network to one batch)
            compute=ray.data.ActorPoolStrategy(
                min_size=layout["min_size"], max_size=layout["max_size"],
                initial_size=layout["initial_size"],
                max_concurrent_calls_per_actor=cfg.calls_per_actor,
                enable_true_multi_threading=cfg.calls_per_actor > 1),
            fn_constructor_kwargs={
                "backbones": backbones, "weights": {b: cfg.weights_for(b) for b in backbones},
                "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                "jit_compile": cfg.jit_compile, "threads": layout["threads"],
                "mixed_precision": cfg.mixed_precision, "seed": cfg.seed,
                "out": str(cfg.out) if layout["writer"] == "actors" else None,
            },
        )
        bar = ExtractProgress(len(pending), done_before=len(plan) - len(pending))
        parts = []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            # the actors wrote the files and return summary rows; with writer "driver" (a local
            # OUT on several nodes) the embeddings come back here and the driver writes them
            part = pd.DataFrame(batch if layout["writer"] == "actors"
                                else write_batch(batch, str(cfg.out), backbones))
            bar.update_from_summary(part)
            parts.append(part)
            faults.point("extract")
        bar.close()
        summary = pd.concat(parts, ignore_index=True)
        files_written = int((summary["kind"] != "batch").sum())
        actors = actor_summary(summary[summary["kind"] == "batch"])
    quarantine = consolidate_quarantine(cfg.out)
    counts = reconcile(plan, cfg.out, backbones, quarantine)
    wall = time.perf_counter() - start
    record = {
        "config": config_to_dict(cfg),
        "versions": _library_versions(),
        **weights_record({b: cfg.weights_for(b) for b in backbones}, identities),
        "cwd": os.getcwd(),  # what relative weights paths above are relative to
        "views_planned": len(plan),
        "views_pending_at_start": len(pending),
        "rows": counts,
        "quarantined": len(quarantine),
        "quarantined_images": int(quarantine["image_id"].nunique()) if len(quarantine) else 0,
        "files_written": files_written,
        "actor_layout": layout,
        "actors": actors,
        "wall_s": round(wall, 2),
        "images_per_s": round(len(pending) / wall, 2) if len(pending) else None,
        "embeddings": storage.join(cfg.out, "embeddings"),
    }
    storage.write_text(storage.join(cfg.out, "extract_run.json"), json.dumps(record, indent=2))
    return record
