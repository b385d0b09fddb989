"""Feature sets for the heads: backbone embeddings (one or several fused), optionally with the
patient metadata HAM10000 ships (age, sex, localization), and image arrays for fine-tuning.

A feature spec is backbone names and ``meta`` joined by ``+``: ``resnet50``, ``resnet50+vgg19``,
``resnet50_ms+meta``. An activation map (``resnet50_c5b2``) is the cached fine-tune's input, on its
own or with ``+meta`` (``resnet50_c5b2+meta``: each map flattened, then the metadata columns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dermray.data import checks
from dermray.data.augment import decode_batch
from dermray.errors import ConfigError
from dermray.models.backbones import BACKBONES
from dermray.models.embeddings import load_activations, load_embeddings

# the one-hot columns of the metadata features: the catalog's known values but "unknown", which
# is all zeros (the order is part of every +meta model's inputs)
SEXES = tuple(s for s in checks.SEXES if s != "unknown")
LOCALIZATIONS = tuple(loc for loc in checks.LOCALIZATIONS if loc != "unknown")
# how many columns ``metadata_matrix`` gives: age, age missing, the sexes, the localizations
N_METADATA = 2 + len(SEXES) + len(LOCALIZATIONS)


def parse_features(spec: str, maps: bool = False) -> tuple[list[str], bool]:
    """Backbone names and whether metadata is added; a clear error for an unknown token.

    An activation-map backbone (``resnet50_c5b2``, ``resnet50_c4b6``) is a feature spec only on
    its own or with ``meta``, and only where ``maps`` says so (the cached fine-tune family's
    input, not the
    embedding heads')."""
    tokens = [t for t in spec.split("+") if t]
    unknown = [t for t in tokens if t != "meta" and t not in BACKBONES]
    backbones = [t for t in tokens if t in BACKBONES]
    if unknown or not backbones:
        raise ConfigError(f"Feature spec {spec!r} must join backbone names ({', '.join(sorted(BACKBONES))}) "
                          "and optionally 'meta' with '+'.")
    found = [b for b in backbones if BACKBONES[b].is_map]
    if found and (not maps or len(backbones) > 1):
        raise ConfigError(
            f"Feature spec {spec!r}: {found[0]} is an activation map (a "
            f"{'x'.join(map(str, BACKBONES[found[0]].map_shape(224)))} tensor per view at 224), "
            "the input of the cached_cnn family, not a feature set for the embedding heads. "
            "Leave it out of search.features; list it in extract.backbones and add cached_cnn to "
            "search.families.")
    return backbones, "meta" in tokens


def metadata_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Age (scaled, with a missing flag), sex and localization one-hot; unknowns are all-zero."""
    age = pd.to_numeric(frame["age"], errors="coerce")
    cols = [np.nan_to_num(age.to_numpy() / 100.0, nan=0.5), age.isna().to_numpy(float)]
    cols += [(frame["sex"] == s).to_numpy(float) for s in SEXES]
    cols += [(frame["localization"] == loc).to_numpy(float) for loc in LOCALIZATIONS]
    return np.stack(cols, axis=1).astype(np.float32)


def embedding_features(out: str | Path, spec: str, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """X, y and the rows of one split. Train keeps every augmented view as its own row; val and
    test average an image's views (test-time augmentation) into one row."""
    backbones, meta = parse_features(spec)
    X, y, frame = load_embeddings(out, backbones, split=split, average_views=split != "train")
    if meta:
        X = np.concatenate([X, metadata_matrix(frame)], axis=1)
    return X, y, frame


def activation_features(out: str | Path, spec: str, split: str
                        ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """X, y and the rows of one split for an activation-map input (``resnet50_c5b2`` or
    ``resnet50_c5b2+meta``): every view to train on, the original views to score (the cached
    fine-tune averages its own flips). X is the maps (N, H, W, C), float16 as cached; with
    ``+meta`` it is rows, each map flattened and followed by the ``N_METADATA`` metadata columns
    (float16 too: one array, as ``dermray predict`` passes it, at the maps' storage cost)."""
    backbones, meta = parse_features(spec, maps=True)
    if len(backbones) != 1 or not BACKBONES[backbones[0]].is_map:
        raise ConfigError(f"Feature spec {spec!r} is not an activation map (with or without "
                          "'+meta'): the cached fine-tune trains on one map backbone.")
    X, y, frame = load_activations(out, backbones[0], split,
                                   views="all" if split == "train" else "original")
    if meta:
        X = np.concatenate([X.reshape(len(X), -1),
                            metadata_matrix(frame).astype(np.float16)], axis=1)
    return X, y, frame


def image_arrays(manifest: pd.DataFrame, split: str, size: int, limit: int = 0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Decoded images of a split (original views) for the fine-tuned CNN; unreadable images are
    left out and listed in the returned frame's ``error`` column."""

    rows = manifest[manifest["split"] == split]
    if limit and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed).sort_values("image_id")
    batch = {"image_id": rows["image_id"].to_numpy(object), "path": rows["path"].to_numpy(object),
             "split": rows["split"].to_numpy(object), "aug_index": np.zeros(len(rows), int)}
    decoded = decode_batch(batch, size, seed)
    ok = np.asarray([not e for e in decoded["error"]])
    rows = rows.assign(error=decoded["error"])
    return decoded["image"][ok], rows["label"].to_numpy()[ok], rows
