"""The stages chained: validate -> split -> extract -> search -> evaluate -> export.

Each ``run_*`` takes its stage's config and returns what it wrote; ``run_pipeline`` reads one
YAML file and runs every stage whose section it has, under one output folder.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from dermray.config import (
    DataConfig,
    SearchConfig,
    config_to_dict,
    load_section,
    output_settings,
    read_yaml,
)
from dermray.data.catalog import (
    build_catalog,
    build_manifest,
    frame_hash,
    manifest_meta,
    read_manifest,
    write_manifest,
)
from dermray.data.synth import METADATA_NAME, write_synth_dataset
from dermray.errors import DermrayError
from dermray.io import fingerprint, storage
from dermray.models.embeddings import backbone_dir
from dermray.models.features import parse_features
from dermray.models.heads import ACTIVATIONS, EMBEDDINGS, get_family
from dermray.stages.extract import check_outputs, run_extract
from dermray.stages.search import check_search_claim, run_search, storage_path
from dermray.stages.select import finish

logger = logging.getLogger(__name__)


def resolve_data(cfg: DataConfig) -> DataConfig:
    """With no metadata but ``synth_n``, write the synthetic dataset first (once, under
    OUT/synthetic, uploaded there when OUT is s3://) and use it."""
    if cfg.metadata:
        return cfg

    dest = storage.join(cfg.out, "synthetic")
    metadata = storage.join(dest, METADATA_NAME)
    if not storage.is_file(metadata):
        # the metadata last: its presence means that the images are all there
        with storage.staged(dest, last=METADATA_NAME) as local:
            write_synth_dataset(local, n=cfg.synth_n, seed=cfg.seed)
    if not storage.is_remote(dest):
        metadata, dest = str(Path(metadata)), str(Path(dest))
    return dataclasses.replace(cfg, metadata=metadata, images=(dest,))


def run_split(cfg: DataConfig, fresh: bool = False) -> tuple[str, pd.DataFrame]:
    """Validate the catalog and write the lesion-grouped split to OUT/manifest.parquet.

    A manifest already in OUT from another catalog or split settings is refused (``fresh``:
    replaced), so that the stages after it never mix two splits."""

    cfg = resolve_data(cfg)
    catalog = build_catalog(cfg.metadata, cfg.images)
    current = fingerprint.make(
        "split", output_settings(cfg),
        {"catalog": frame_hash(catalog.frame.sort_values("image_id"))}, ("pandas", "numpy"))
    if check_manifest(cfg.out, current, fresh):  # the same split is there: keep it untouched

        path = storage.join(cfg.out, "manifest.parquet")
        path = path if storage.is_remote(path) else storage.open_fs(path)[1]
        return path, read_manifest(path)
    manifest = build_manifest(catalog, (cfg.train_frac, cfg.val_frac, cfg.test_frac), cfg.seed)
    path = write_manifest(manifest, cfg.out, config_to_dict(cfg), current)
    logger.info("wrote %s (%d images)", path, len(manifest))
    return path, manifest


def check_manifest(out: str, current: dict[str, Any], fresh: bool) -> bool:
    """Whether OUT already holds this very split; refuse to overwrite it with a split of other
    settings or another catalog (unless ``fresh``)."""

    path = storage.join(out, "manifest.parquet")
    if not storage.is_file(path):
        return False
    old = manifest_meta(path).get("fingerprint") or {}
    if old.get("key") == current["key"]:
        return True
    if not fresh:
        changed = "; ".join(fingerprint.differences(old, current))
        raise fingerprint.StaleOutputError(
            f"{storage.display(path)} holds another split ({changed}). Everything after it was "
            "made from that split: write to a new --out, or pass --fresh to redo the stages.")
    return False


def run_pipeline(config_path: str, out: str, fresh: bool = False) -> dict[str, Any]:
    """Run every stage the config has a section for, all writing under ``out`` (``fresh``:
    redo every stage whose output was made with other settings)."""
    out = storage.strip_credentials(out)  # its credentials, if any, are read here, once
    sections = read_yaml(config_path)
    result: dict[str, Any] = {"out": out}
    data_cfg = load_section("data", config_path, {"out": out})
    manifest_path, manifest = run_split(data_cfg, fresh=fresh)
    result["manifest"] = manifest_path
    result["split_sizes"] = manifest["split"].value_counts().to_dict()
    extract_cfg = (load_section("extract", config_path, {"manifest": manifest_path, "out": out})
                   if "extract" in sections else None)
    if "search" in sections:
        # every stage's settings checked before the first of them starts Ray (30 s)
        extracting = check_outputs(extract_cfg, fresh) if extract_cfg else {}
        search_cfg = load_section("search", config_path, {"out": out})
        check_search_claim(search_cfg, manifest_path, extracting, fresh)
    if extract_cfg is not None:
        record = run_extract(extract_cfg, fresh=fresh)
        result["embeddings"] = record["embeddings"]
        result["extract_rows"] = {k: v["rows"] for k, v in record["rows"].items()}
    if "search" in sections:
        summary = run_search_stage(config_path, out, manifest_path, fresh=fresh)
        result.update(summary)
    return result


def run_search_stage(config_path: str | None, out: str, manifest_path: str,
                     overrides: dict[str, Any] | None = None,
                     fresh: bool = False) -> dict[str, Any]:
    """Search the heads on OUT's embeddings, then select, score on test once, export."""

    out, manifest_path = storage.strip_credentials((out, manifest_path))
    cfg = load_section("search", config_path, {"out": out, **(overrides or {})})
    check_search_inputs(cfg, manifest_path)  # before Ray starts: a message in a second
    results = run_search(cfg, manifest_path, fresh=fresh)
    summary = finish(results, cfg, manifest_path, out)
    win = summary["winner"]
    keys = ("accuracy", "balanced_accuracy", "melanoma_sensitivity", "melanoma_specificity")
    return {
        "out": out,
        "winner": {"family": win["family"], "features": win["features"],
                   "trial_id": win["trial_id"],
                   "val_accuracy": round(win["val"]["accuracy"], 4),
                   "test_accuracy": round(win["test"]["accuracy"], 4),
                   "test_balanced_accuracy": round(win["test"]["balanced_accuracy"], 4)},
        # each decision policy's figures on val and test ({split: {"policies": {name: ...}}})
        "policies": {split: {"policies": {name: {k: m.get(k) for k in keys}
                                          for name, m in report["policies"].items()}}
                     for split, report in summary["policies"].items()},
        "trials": storage.join(out, "trials.csv"),
        "metrics": storage.join(out, "metrics.json"),
        "report": storage.join(out, "report.md"),
        "report_html": storage.join(out, "report.html"),
        "model": storage.join(out, "model"),
        "tune_logs": storage_path(cfg),
        # the ensemble candidate: chosen or not, and why (out-of-fold val accuracy)
        **({"ensemble": summary["ensemble"].get("reason", "")}
           if summary.get("ensemble") else {}),
    }


def check_search_inputs(cfg: SearchConfig, manifest_path: str) -> None:
    """What the search reads, present before Ray starts: the manifest, and the embeddings (or
    activation maps) of every backbone its families read, each with a part file."""
    if not storage.is_file(manifest_path):
        raise DermrayError(f"No manifest at {storage.display(manifest_path)}: run `dermray data "
                           "split --out OUT` (or `dermray run`) first, or pass --manifest.")
    needed: dict[str, str] = {}
    for fam in cfg.families:
        spec = get_family(fam)
        if spec.input == EMBEDDINGS:
            for features in cfg.features:
                needed.update(dict.fromkeys(parse_features(features)[0], f"features '{features}'"))
        elif spec.input == ACTIVATIONS:
            for key in spec.input_key(cfg):
                needed.update(dict.fromkeys(parse_features(key, maps=True)[0], f"family '{fam}'"))
    missing = [(name, why) for name, why in needed.items()
               if not storage.list_files(backbone_dir(cfg.out, name), ".parquet")]
    if missing:
        names = ", ".join(f"{name} (for {why})" for name, why in missing)
        raise DermrayError(f"No embeddings in {storage.display(cfg.out)} for {names}: run "
                           f"`dermray extract --out {storage.display(cfg.out)}` with these "
                           "backbones first (or `dermray run`, which extracts before it searches).")
