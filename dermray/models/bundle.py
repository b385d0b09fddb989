"""The exported model bundle: load it and predict on image files (``dermray predict``)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermray.data.augment import DecodeError, decode_image, dihedral
from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.backbones import BACKBONES, FrozenExtractor, find_weights, get_spec
from dermray.models.features import metadata_matrix, parse_features
from dermray.models.heads import EMBEDDINGS, IMAGES, get_family, load_head
from dermray.models.policies import decide

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Bundle:
    spec: dict[str, Any]
    head: Any
    directory: Path
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> weights found for it
    _embedder: Any = None

    @property
    def labels(self) -> list[str]:
        return list(self.spec["labels"])

    def embedder(self):
        if self._embedder is None and self.spec["backbones"]:

            names = [b["name"] for b in self.spec["backbones"]]
            # XLA doubles ResNet50 at 224 but its compile (20-30 s on 2 cores) outweighs the
            # gain on small inputs, as in tests
            size = self.spec["image_size"]
            self._embedder = FrozenExtractor(names, self.weights, size, batch_size=16,
                                             jit_compile=size >= 96,
                                             seed=self.spec.get("seed", 0))
        return self._embedder

    def features(self, images: np.ndarray, meta: pd.DataFrame | None = None) -> np.ndarray:
        """Head inputs for decoded images: embeddings (TTA-averaged as in training) + metadata
        (``meta``: age, sex, localization per image; None: the 'unknown' encoding)."""

        if get_family(self.spec["family"]).input == IMAGES:
            return images
        embedder = self.embedder()

        parts = []
        for name in [b["name"] for b in self.spec["backbones"]]:
            # an activation map is scored on the original view, as in training (the head
            # averages its own flips); embeddings average the extraction's TTA views
            views = range(1 if get_spec(name).is_map else self.spec.get("tta_views", 0) + 1)
            stacked = np.mean([embedder.embed(name, np.stack([dihedral(im, k) for im in images]))
                               for k in views], axis=0)
            parts.append(stacked)
        X = np.concatenate(parts, axis=1)
        if self.uses_metadata:
            if meta is None:  # no patient metadata given: the "unknown" encoding
                meta = pd.DataFrame({"age": [np.nan] * len(X), "sex": "unknown",
                                     "localization": "unknown"})
            X = np.concatenate([X, metadata_matrix(meta.reset_index(drop=True))], axis=1)
        return X

    @property
    def uses_metadata(self) -> bool:

        return (get_family(self.spec["family"]).input == EMBEDDINGS
                and parse_features(self.spec["features"], maps=True)[1])

    def decide(self, proba: np.ndarray, policy: str = "accuracy") -> np.ndarray:
        """Class indices under one of the bundle's operating points (argmax where the bundle
        has none: bundles made before operating points existed)."""

        points = self.spec.get("operating_points")
        if points is None:
            if policy != "accuracy":
                raise DermrayError(f"This bundle has no operating points, so no {policy!r} "
                                   "policy; export it again with this version of dermray.")
            return proba.argmax(axis=1)
        return decide(proba, points, policy)

    def iter_predictions(self, paths: Iterable[Path], metadata: pd.DataFrame | None = None,
                         policy: str = "accuracy", limits: Limits | None = None
                         ) -> Iterator[tuple[pd.DataFrame, list[str]]]:
        """Predictions in batches of ``limits.batch_size`` files, so that memory does not grow
        with the number of files: (rows, problems) per batch.

        A row per readable image (``path``, ``image_id``, ``dx``, ``policy``, ``p_<class>``); a
        problem per skipped file, naming it and why (not a regular file, over a size limit,
        not an image). ``metadata`` (HAM10000 columns, indexed by image_id) feeds models trained
        with patient metadata; images it does not list get the 'unknown' encoding.
        ``p_<class>`` are the head's probabilities; ``dx`` is the decision of ``policy``
        (accuracy: the argmax; balanced; melanoma), taken on the temperature-scaled ones."""
        limits = limits or Limits()
        batch: list[Path] = []
        for path in paths:
            batch.append(Path(path))
            if len(batch) == limits.batch_size:
                yield self._predict_batch(batch, metadata, policy, limits)
                batch = []
        if batch:
            yield self._predict_batch(batch, metadata, policy, limits)

    def predict_files(self, paths: Iterable[Path], metadata: pd.DataFrame | None = None,
                      policy: str = "accuracy", limits: Limits | None = None
                      ) -> tuple[pd.DataFrame, list[str]]:
        """All of ``iter_predictions`` at once (for a few files)."""
        frames, problems = [], []
        for frame, found in self.iter_predictions(paths, metadata, policy, limits):
            frames += [frame] if len(frame) else []
            problems += found
        return (pd.concat(frames, ignore_index=True) if frames else self._empty()), problems

    def _empty(self) -> pd.DataFrame:
        return pd.DataFrame(columns=["path", "image_id", "dx", "policy",
                                     *[f"p_{c}" for c in self.labels]])

    def _predict_batch(self, paths: list[Path], metadata: pd.DataFrame | None, policy: str,
                       limits: Limits) -> tuple[pd.DataFrame, list[str]]:
        images, kept, problems = [], [], []
        for path in paths:
            try:
                data = read_image_file(path, limits.max_bytes)
                images.append(decode_image(data, self.spec["image_size"],
                                           max_pixels=limits.max_pixels))
                kept.append(path)
            except (DecodeError, OSError) as exc:
                problems.append(f"{path}: {exc}; skipped")
        if not images:
            return self._empty(), problems
        ids = [p.stem for p in kept]
        meta = None
        if metadata is not None and self.uses_metadata:
            meta = pd.DataFrame({"age": [metadata["age"].get(i, np.nan) for i in ids],
                                 "sex": [metadata["sex"].get(i, "unknown") for i in ids],
                                 "localization": [metadata["localization"].get(i, "unknown")
                                                  for i in ids]})
        proba = self.head.predict_proba(self.features(np.stack(images), meta))
        frame = pd.DataFrame(proba, columns=[f"p_{c}" for c in self.labels])
        frame.insert(0, "policy", policy)
        frame.insert(0, "dx", [self.labels[i] for i in self.decide(proba, policy)])
        frame.insert(0, "image_id", ids)
        frame.insert(0, "path", [str(p) for p in kept])
        return frame, problems


@dataclass(frozen=True)
class Limits:
    """What `dermray predict` reads at most: bytes per file, pixels per image, files per batch."""

    max_bytes: int = 50_000_000
    max_pixels: int = 40_000_000
    batch_size: int = 64

    def __post_init__(self) -> None:
        for key in ("max_bytes", "max_pixels", "batch_size"):
            if getattr(self, key) < 1:
                raise DermrayError(f"--{key.replace('_', '-')} must be >= 1. Got "
                                   f"{getattr(self, key)} instead.")


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes`` (a FIFO, device or socket is never read)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise DecodeError("not a regular file (a folder, FIFO, device or socket)")
    if info.st_size > max_bytes:
        raise DecodeError(f"{info.st_size} bytes is over the limit of {max_bytes} bytes "
                          "(--max-bytes)")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DecodeError(f"grew over the limit of {max_bytes} bytes while read (--max-bytes)")
    return data


def load_bundle(model: str | Path, weights_dirs: Sequence[str | Path] = ()) -> Bundle:
    """Load OUT/model (a folder or an ``s3://`` URI).

    Each backbone's weights are found by their recorded identity (sha256) in ``weights_dirs``,
    $DERMRAY_WEIGHTS_DIR or the Keras cache, or downloaded from Keras where they are its ImageNet
    file; a file with another hash is never used.
    """

    directory = Path(model)
    if storage.is_remote(model):
        directory = Path(tempfile.mkdtemp(prefix="dermray-model-"))
        atexit.register(storage.remove, directory, tempfile.gettempdir(), "downloaded bundle",
                        logging.DEBUG, best_effort=True)
        storage.download_dir(model, directory)
    spec_path = directory / "bundle.json"
    if not spec_path.is_file():
        raise DermrayError(f"{storage.display(model)} is not a dermray model bundle (no "
                           "bundle.json); pass the OUT/model folder of a `dermray run`.")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as exc:
        raise BundleError(f"{storage.display(model)}/bundle.json is not valid JSON: {exc}. "
                          "Export the bundle again (dermray run / search).") from None
    check_spec(spec, storage.display(model))
    weights = {}
    for b in spec["backbones"]:
        recorded = b.get("weights", "")  # format 1 recorded a path: its folder is one more place
        extra = [*weights_dirs, *([Path(recorded).parent] if recorded else [])]
        weights[b["name"]] = find_weights(b["name"], b.get("weights_identity", "unknown"),
                                          b.get("weights_name") or Path(recorded).name, extra)
    head = load_head(spec["family"], directory / "head")
    check_head(spec, head, storage.display(model))
    return Bundle(spec=spec, head=head, directory=directory, weights=weights)


class BundleError(DermrayError):
    """A bundle whose bundle.json or head does not say what the model is."""


REQUIRED = {"family": str, "features": str, "backbones": list, "image_size": int, "labels": list}


def check_spec(spec: Any, where: str) -> None:
    """bundle.json holds every key, the labels in dermray's order, known backbones, a sane size."""

    def bad(field: str, must: str, got: Any) -> BundleError:
        return BundleError(f"{where}/bundle.json: '{field}' must be {must}. Got {got!r} instead. "
                           "The bundle was edited or damaged: export it again.")

    if not isinstance(spec, dict):
        raise bad("(top level)", "a mapping", type(spec).__name__)
    for key, kind in REQUIRED.items():
        if not isinstance(spec.get(key), kind) or isinstance(spec.get(key), bool):
            raise bad(key, f"present and a {kind.__name__}", spec.get(key, "(missing)"))
    if spec["labels"] != list(CLASSES):
        raise bad("labels", f"{list(CLASSES)} in this order (the head's outputs)", spec["labels"])
    if not 32 <= spec["image_size"] <= 1024:
        raise bad("image_size", "an integer in [32, 1024]", spec["image_size"])
    get_family(spec["family"])  # an unknown family lists the known ones
    for i, b in enumerate(spec["backbones"]):
        if not isinstance(b, dict) or b.get("name") not in BACKBONES:
            raise bad(f"backbones[{i}].name", f"one of {sorted(BACKBONES)}", b)
        if not isinstance(b.get("weights_identity"), str):
            raise bad(f"backbones[{i}].weights_identity", "'none' or 'sha256:<hex>'", b)


def expected_inputs(spec: dict[str, Any]) -> int:
    """How many inputs the head must take: the backbones' feature sizes (+ the metadata
    encoding), or the pixels of an image family."""

    if get_family(spec["family"]).input == IMAGES:
        return spec["image_size"] * spec["image_size"] * 3
    size = sum(get_spec(b["name"]).dim(spec["image_size"]) for b in spec["backbones"])
    if parse_features(spec["features"], maps=True)[1]:
        size += metadata_matrix(pd.DataFrame({"age": [np.nan], "sex": ["unknown"],
                                              "localization": ["unknown"]})).shape[1]
    return size


def check_head(spec: dict[str, Any], head: Any, where: str) -> None:
    """The head takes what the bundle's backbones give, and gives the 7 classes."""
    want = expected_inputs(spec)
    if getattr(head, "n_features_in_", want) != want:
        raise BundleError(
            f"{where}: the head takes {head.n_features_in_} inputs, but bundle.json's backbones "
            f"and features ({spec['features']}) give {want}. The bundle was edited or damaged: "
            "export it again.")
    classes = getattr(head, "classes_", None)
    if classes is not None and len(classes) != len(spec["labels"]):
        raise BundleError(f"{where}: the head gives {len(classes)} classes, bundle.json's labels "
                          f"name {len(spec['labels'])}. Export the bundle again.")


def collect_images(inputs: Iterable[str]) -> list[Path]:
    """Files given directly (whatever their suffix: bad ones are reported) and images in folders."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files
