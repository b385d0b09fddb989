"""The exported model bundle: what it is (``BundleSpec``), how it is written and read, and the
loaded model (``Bundle``: backbones + head + decision policy, applied to decoded images).

OUT/model holds ``bundle.json`` (the spec), ``head/`` (in a format that runs no code on load) and
``model_card.md``. ``BundleSpec.write`` and ``read_spec`` are the only code that writes and reads
bundle.json: every field is checked on load, to the last number, and bundle.json records a
sha256 of every other file and of its own content, so an edited or damaged bundle is refused,
naming the file and the field, before any image is read.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermray.data.augment import dihedral
from dermray.domain import CLASSES
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.backbones import (
    BACKBONES,
    IMAGE_SIZE_RULE,
    PREPROCESSING,
    RANDOM,
    WEIGHTS_ORIGINS,
    FrozenExtractor,
    find_weights,
    get_spec,
    valid_image_size,
)
from dermray.models.ensemble import ENSEMBLE, EnsembleHead
from dermray.models.features import metadata_matrix, parse_features
from dermray.models.heads import EMBEDDINGS, FAMILY_SPECS, IMAGES, get_family, load_head
from dermray.models.policies import decide, get_policy

logger = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
FORMAT = 4  # bundle.json's layout; another one is refused (export the bundle again)
VIEWS = 8  # the dihedral group's views (augment.dihedral): tta_views counts the extra ones
HEX = "0123456789abcdef"


class BundleError(DermrayError):
    """A bundle whose bundle.json or head does not say what the model is."""


def _problem(where: str, name: str, must: str, got: Any) -> BundleError:
    return BundleError(f"{where}: '{name}' must be {must}. Got {got!r} instead. The bundle was "
                       "edited or damaged: export it again.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class BackboneRecord:
    """A frozen backbone as trained: its weights by content, where they were found, where they
    come from, and the preprocessing its embeddings were made with."""

    name: str
    weights_identity: str  # 'none' (seeded random weights) or 'sha256:<hex>': decides
    weights_name: str  # the file name trained with: a hint for finding it, identity decides
    preprocessing: str  # a mode of backbones.PREPROCESSING
    # the absolute path the weights were read at in training: predict looks there first (a
    # hint: a file there is used only if its sha256 is the identity; '' for random weights)
    weights_hint: str = ""
    # 'random' (seeded random weights: a demo, meaningless on real images), 'keras' (Keras' own
    # ImageNet file: may be downloaded) or 'file' (the user's own file: never downloaded)
    weights_origin: str = ""

    def __post_init__(self) -> None:
        if not self.weights_origin:  # derived where a caller does not say
            object.__setattr__(self, "weights_origin",
                               RANDOM if self.weights_identity == "none" else "file")

    @classmethod
    def of(cls, name: str, weights_identity: str, weights_name: str = "",
           weights_hint: str = "", weights_origin: str = "") -> BackboneRecord:
        """The record of a backbone as the registry defines it now (at export)."""
        return cls(name, weights_identity, weights_name, get_spec(name).preprocessing,
                   weights_hint, weights_origin)

    @property
    def random_weights(self) -> bool:
        return self.weights_origin == RANDOM

    def check(self, where: str, index: int) -> None:
        key = f"backbones[{index}]"
        if self.name not in BACKBONES:
            raise _problem(where, f"{key}.name", f"one of {sorted(BACKBONES)}", self.name)
        identity = self.weights_identity
        digest = identity[7:] if isinstance(identity, str) and identity[:7] == "sha256:" else ""
        if not (identity == "none" or (len(digest) == 64 and set(digest) <= set(HEX))):
            raise _problem(where, f"{key}.weights_identity", "'none' or 'sha256:<64 hex digits>'",
                           identity)
        for field_name in ("weights_name", "weights_hint"):
            if not isinstance(getattr(self, field_name), str):
                raise _problem(where, f"{key}.{field_name}", "a string (or '')",
                               getattr(self, field_name))
        if self.weights_origin not in WEIGHTS_ORIGINS:
            raise _problem(where, f"{key}.weights_origin", f"one of {list(WEIGHTS_ORIGINS)}",
                           self.weights_origin)
        if (identity == "none") != (self.weights_origin == RANDOM):
            raise _problem(where, f"{key}.weights_origin", f"'{RANDOM}' exactly when "
                           "weights_identity is 'none'", self.weights_origin)
        if self.preprocessing not in PREPROCESSING:
            raise _problem(where, f"{key}.preprocessing", f"one of {sorted(PREPROCESSING)}",
                           self.preprocessing)


@dataclass(frozen=True)
class MemberRecord:
    """One member of an ensemble bundle: a trial's head (saved at ``head/<i>/``), what it was
    fitted on, and its weight in the soft vote."""

    family: str
    features: str
    params: dict[str, Any]
    trial_id: str
    weight: float

    def check(self, where: str, index: int) -> None:
        key = f"members[{index}]"
        if self.family not in FAMILY_SPECS or get_family(self.family).input == IMAGES:
            raise _problem(where, f"{key}.family", "a family on embeddings or activation maps: "
                           + ", ".join(f for f, s in FAMILY_SPECS.items() if s.input != IMAGES),
                           self.family)
        for name in ("features", "trial_id"):
            if not isinstance(getattr(self, name), str):
                raise _problem(where, f"{key}.{name}", "a string", getattr(self, name))
        try:
            parse_features(self.features, maps=True)
        except DermrayError as exc:
            raise _problem(where, f"{key}.features", f"a feature spec ({exc})",
                           self.features) from None
        if not isinstance(self.params, dict):
            raise _problem(where, f"{key}.params", "a mapping", self.params)
        if not (_is_number(self.weight) and 0 <= self.weight <= 1):
            raise _problem(where, f"{key}.weight", "a number in [0, 1]", self.weight)

    @property
    def backbones(self) -> list[str]:
        return parse_features(self.features, maps=True)[0]

    @property
    def uses_metadata(self) -> bool:
        return parse_features(self.features, maps=True)[1]


def ensemble_features(members: Sequence[MemberRecord]) -> str:
    """An ensemble bundle's ``features``: its members' families and feature specs."""
    return " | ".join(f"{m.family}:{m.features}" for m in members)


def ensemble_backbones(members: Sequence[MemberRecord]) -> list[str]:
    """The backbones an ensemble's members read, each once, in the members' order (the bundle's
    extractor computes them all in one pass)."""
    out: list[str] = []
    for m in members:
        out += [b for b in m.backbones if b not in out]
    return out


@dataclass(frozen=True)
class BundleSpec:
    """What an exported model is: everything ``dermray predict`` and ``explain`` need, and the
    figures the model card shows. Validated when made: an export cannot write a bundle its own
    load would refuse."""

    family: str
    features: str  # the feature spec the head was fitted on ("images" for an images family)
    backbones: tuple[BackboneRecord, ...]
    image_size: int
    tta_views: int  # extra dihedral views averaged into an embedding (0: the image only)
    seed: int  # seeds random ('none') backbone weights, as the extraction did
    params: dict[str, Any]
    trial_id: str
    metrics: dict[str, Any]
    operating_points: dict[str, Any] | None = None  # None: argmax only
    labels: tuple[str, ...] = CLASSES
    # a soft-vote ensemble's members (family 'ensemble'); empty for a single trial's bundle,
    # whose bundle.json then has no 'members' key (as before ensembles)
    members: tuple[MemberRecord, ...] = ()
    where: InitVar[str] = "the bundle"  # the file named in messages

    def __post_init__(self, where: str) -> None:
        for key in ("backbones", "labels", "members"):  # lists from JSON or a caller: tuples here
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        self._check(where)

    # ---- validation (every field, on export and on load) --------------------------------------

    def _check(self, where: str) -> None:
        if self.labels != CLASSES:
            raise _problem(where, "labels", f"{list(CLASSES)} in this order (the head's outputs)",
                           list(self.labels))
        for key in ("family", "features", "trial_id"):
            if not isinstance(getattr(self, key), str):
                raise _problem(where, key, "a string", getattr(self, key))
        if self.family not in FAMILY_SPECS and not (self.family == ENSEMBLE and self.members):
            raise _problem(where, "family", f"one of {', '.join(FAMILY_SPECS)} (or "
                           f"'{ENSEMBLE}' with members)", self.family)
        if not valid_image_size(self.image_size):
            raise _problem(where, "image_size", IMAGE_SIZE_RULE, self.image_size)
        if not (_is_int(self.tta_views) and 0 <= self.tta_views < VIEWS):
            raise _problem(where, "tta_views", f"an integer in [0, {VIEWS - 1}] (the dihedral "
                           "group's other views)", self.tta_views)
        if not (_is_int(self.seed) and self.seed >= 0):
            raise _problem(where, "seed", "a non-negative integer", self.seed)
        for key in ("params", "metrics"):
            if not isinstance(getattr(self, key), dict):
                raise _problem(where, key, "a mapping", getattr(self, key))
        if not isinstance(self.backbones, tuple):
            raise _problem(where, "backbones", "a list of backbone records", self.backbones)
        for i, record in enumerate(self.backbones):
            if not isinstance(record, BackboneRecord):
                raise _problem(where, f"backbones[{i}]", "a backbone record", record)
            record.check(where, i)
        names = [b.name for b in self.backbones]
        if self.is_ensemble:
            self._check_members(where, names)
        elif self.members:
            raise _problem(where, "members", f"empty (only an '{ENSEMBLE}' bundle has members)",
                           "(a list)")
        elif self.takes_images:
            if self.features != IMAGES or names:
                raise _problem(where, "features", f"'{IMAGES}' with no backbones (the "
                               f"{self.family} family takes images)", [self.features, names])
        else:
            try:
                wanted = parse_features(self.features, maps=True)[0]
            except DermrayError as exc:
                raise _problem(where, "features", f"a feature spec ({exc})",
                               self.features) from None
            if wanted != names:
                raise _problem(where, "backbones", f"the backbones of features "
                               f"{self.features!r}: {wanted}", names)
        check_operating_points(self.operating_points, where)

    def _check_members(self, where: str, names: list[str]) -> None:
        if not isinstance(self.members, tuple) or len(self.members) < 2:
            raise _problem(where, "members", "a list of 2 or more member records", self.members)
        for i, member in enumerate(self.members):
            if not isinstance(member, MemberRecord):
                raise _problem(where, f"members[{i}]", "a member record", member)
            member.check(where, i)
        total = sum(m.weight for m in self.members)
        if abs(total - 1.0) > 1e-6:
            raise _problem(where, "members", "weights that sum to 1", total)
        if self.features != ensemble_features(self.members):
            raise _problem(where, "features", "the members' families and features: "
                           f"{ensemble_features(self.members)!r}", self.features)
        if names != ensemble_backbones(self.members):
            raise _problem(where, "backbones", f"the members' backbones: "
                           f"{ensemble_backbones(self.members)}", names)

    @property
    def is_ensemble(self) -> bool:
        return self.family == ENSEMBLE

    @property
    def takes_images(self) -> bool:
        return not self.is_ensemble and get_family(self.family).input == IMAGES

    @property
    def random_backbones(self) -> list[str]:
        """The backbones on seeded random weights (a demo's): on real images its predictions
        mean nothing."""
        return [b.name for b in self.backbones if b.random_weights]

    # ---- bundle.json: the one writer and the one reader ---------------------------------------

    def to_json(self, files: Mapping[str, str]) -> str:
        """bundle.json's text: the fields, the sha256 of every other file of the bundle
        (``files``: relative path -> 'sha256:<hex>') and a checksum of all of that."""
        body = {"format": FORMAT, **asdict(self), "files": dict(sorted(files.items()))}
        body["backbones"] = [asdict(b) for b in self.backbones]
        if self.members:
            body["members"] = [asdict(m) for m in self.members]
        else:  # a single trial's bundle.json is as it was before ensembles
            body.pop("members")
        body["labels"] = list(self.labels)
        body = json.loads(json.dumps(body))  # the checksum is of what a reader will parse
        return json.dumps({**body, "checksum": _checksum(body)}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> tuple[BundleSpec, dict[str, str]]:
        """The spec and the recorded file hashes of bundle.json's text; every field checked,
        then the checksum (so that a bad value is named, and any other edit is refused)."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise BundleError(f"{where} is not valid JSON: {exc}. Export the bundle again "
                              "(dermray run / search).") from None
        if not isinstance(body, dict):
            raise _problem(where, "(top level)", "a mapping", type(body).__name__)
        if body.get("format") != FORMAT:
            raise BundleError(f"{where} is bundle format {body.get('format')!r}; this dermray "
                              f"reads format {FORMAT}. Export the bundle again with it.")
        names = [f.name for f in fields(cls)]
        for key in [*names, "files", "checksum"]:
            if key not in body and key != "members":  # members: an ensemble's only
                raise _problem(where, key, "present", "(missing)")
        unknown = sorted(set(body) - {*names, "format", "files", "checksum"})
        if unknown:
            raise _problem(where, unknown[0], "absent (not a bundle field)", body[unknown[0]])
        records = body["backbones"]
        if not isinstance(records, list):
            raise _problem(where, "backbones", "a list", records)
        keys = [f.name for f in fields(BackboneRecord)]
        for i, record in enumerate(records):
            if not isinstance(record, dict) or sorted(record) != sorted(keys):
                raise _problem(where, f"backbones[{i}]", f"a mapping of {', '.join(keys)}",
                               record)
        members = body.get("members", [])
        member_keys = [f.name for f in fields(MemberRecord)]
        if not isinstance(members, list):
            raise _problem(where, "members", "a list", members)
        for i, record in enumerate(members):
            if not isinstance(record, dict) or sorted(record) != sorted(member_keys):
                raise _problem(where, f"members[{i}]", f"a mapping of {', '.join(member_keys)}",
                               record)
        files = body["files"]
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise _problem(where, "files", "a mapping of file -> 'sha256:<hex>'", files)
        labels = body["labels"]
        spec = cls(**{**{k: body[k] for k in names if k != "members"},
                      "backbones": tuple(BackboneRecord(**r) for r in records),
                      "members": tuple(MemberRecord(**r) for r in members),
                      "labels": tuple(labels) if isinstance(labels, list) else labels},
                   where=where)
        recorded = body.pop("checksum")
        if recorded != _checksum(body):
            raise BundleError(f"{where} was changed after export: its checksum does not match "
                              "its content. Export the bundle again (or restore its files).")
        return spec, files

    def write(self, directory: str | Path) -> Path:
        """``directory/bundle.json``, recording the sha256 of every file already there (write
        the head and the model card first)."""
        directory = Path(directory)
        target = directory / BUNDLE_FILE
        target.write_text(self.to_json(_file_hashes(directory)))
        return target


def _checksum(body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    """relative path -> 'sha256:<hex>' of every file of a bundle folder but bundle.json."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != BUNDLE_FILE:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out[rel] = f"sha256:{digest.hexdigest()}"
    return out


def read_spec(directory: str | Path, where: str | None = None) -> BundleSpec:
    """The checked spec of a local bundle folder, whose files are those bundle.json records."""
    directory = Path(directory)
    where = where or str(directory)
    path = directory / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{where} is not a dermray model bundle (no {BUNDLE_FILE}); pass the "
                          "OUT/model folder of a `dermray run`.")
    spec, recorded = BundleSpec.from_json(path.read_text(), f"{where}/{BUNDLE_FILE}")
    found = _file_hashes(directory)
    for rel in sorted(set(recorded) | set(found)):
        if rel not in found:
            raise BundleError(f"{where}/{rel} is missing: the bundle is incomplete. Copy the "
                              "whole OUT/model folder, or export the bundle again.")
        if rel not in recorded:
            raise BundleError(f"{where}/{rel} is not a file the export wrote: remove it, or "
                              "export the bundle again.")
        if found[rel] != recorded[rel]:
            raise BundleError(f"{where}/{rel} was changed after export (its sha256 is not the "
                              f"one {BUNDLE_FILE} records). Export the bundle again.")
    return spec


def check_operating_points(points: Any, where: str) -> None:
    """The temperature, and each policy's numbers as its own spec checks them (a threshold in
    [0, 1], a prior over the labels that sums to 1, ...); an unknown policy is refused too."""
    if points is None:
        return
    if not isinstance(points, dict) or not isinstance(points.get("policies"), dict):
        raise _problem(where, "operating_points", "a mapping with 'temperature' and 'policies'",
                       points)
    temperature = points.get("temperature")
    if not (_is_number(temperature) and temperature > 0):
        raise _problem(where, "operating_points.temperature", "a finite number > 0", temperature)
    for policy, params in points["policies"].items():
        key = f"operating_points.policies.{policy}"
        if not isinstance(params, dict):
            raise _problem(where, key, "a mapping", params)
        try:
            get_policy(policy).check(params)
        except DermrayError as exc:
            raise BundleError(f"{where}: '{key}': {exc} The bundle was edited or damaged: "
                              "export it again.") from None


# ---- the loaded model -------------------------------------------------------------------------

@dataclass
class Bundle:
    """A loaded bundle: the spec, the head, and the weights found for each backbone."""

    spec: BundleSpec
    head: Any
    directory: Path
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> weights found for it
    _embedder: Any = None

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def embedder(self) -> FrozenExtractor | None:
        if self._embedder is None and self.spec.backbones:
            # XLA doubles ResNet50 at 224 but its compile (20-30 s on 2 cores) outweighs the
            # gain on small inputs, as in tests
            size = self.spec.image_size
            self._embedder = FrozenExtractor(
                [b.name for b in self.spec.backbones], self.weights, size, batch_size=16,
                jit_compile=size >= 96, seed=self.spec.seed,
                preprocessing={b.name: b.preprocessing for b in self.spec.backbones})
        return self._embedder

    def features(self, images: np.ndarray, meta: pd.DataFrame | None = None
                 ) -> np.ndarray | list[np.ndarray]:
        """Head inputs for decoded images: embeddings (TTA-averaged as in training) + metadata
        (``meta``: age, sex, localization per image; None: the 'unknown' encoding). An
        ensemble's: one array per member, from one pass of each backbone over the images."""
        if self.spec.takes_images:
            return images
        embedder = self.embedder()
        parts = {}
        for name in [b.name for b in self.spec.backbones]:
            # an activation map is scored on the original view, as in training (the head
            # averages its own flips); embeddings average the extraction's TTA views
            views = range(1 if get_spec(name).is_map else self.spec.tta_views + 1)
            parts[name] = np.mean([embedder.embed(name, np.stack([dihedral(im, k)
                                                                  for im in images]))
                                   for k in views], axis=0)
        if self.uses_metadata and meta is None:  # no patient metadata given: "unknown"
            meta = pd.DataFrame({"age": [np.nan] * len(images), "sex": "unknown",
                                 "localization": "unknown"})
        encoded = (metadata_matrix(meta.reset_index(drop=True)) if self.uses_metadata
                   else None)
        if self.spec.is_ensemble:
            return [_joined(parts, m.backbones, encoded if m.uses_metadata else None)
                    for m in self.spec.members]
        return _joined(parts, list(parts), encoded)

    def predict_proba(self, images: np.ndarray, meta: pd.DataFrame | None = None) -> np.ndarray:
        """The head's probabilities for decoded images (N, S, S, 3) uint8."""
        return self.head.predict_proba(self.features(images, meta))

    @property
    def uses_metadata(self) -> bool:
        """Whether the head takes patient metadata after the backbones' features (``+meta``:
        an embedding family's, or a cached fine-tune's after its pooling; an ensemble: any
        member's)."""
        if self.spec.is_ensemble:
            return any(m.uses_metadata for m in self.spec.members)
        return (get_family(self.spec.family).input != IMAGES
                and parse_features(self.spec.features, maps=True)[1])

    def decide(self, proba: np.ndarray, policy: str = "accuracy") -> np.ndarray:
        """Class indices under one of the bundle's operating points (argmax for a bundle
        exported without them)."""
        points = self.spec.operating_points
        if points is None:
            if policy != "accuracy":
                raise DermrayError(f"This bundle was exported without operating points, so it "
                                   f"has no {policy!r} policy; only 'accuracy' (the argmax).")
            return proba.argmax(axis=1)
        if policy not in points["policies"]:
            raise DermrayError(f"This bundle has no {policy!r} operating point; it has "
                               f"{', '.join(points['policies'])}. Export it again to add it.")
        return decide(proba, points, policy)


def _joined(parts: Mapping[str, np.ndarray], names: Sequence[str],
            meta: np.ndarray | None) -> np.ndarray:
    """One head's input: its backbones' embeddings side by side (+ the metadata encoding)."""
    X = np.concatenate([parts[n] for n in names], axis=1)
    return X if meta is None else np.concatenate([X, meta], axis=1)


def load_bundle(model: str | Path, weights_dirs: Sequence[str | Path] = (),
                warn_random: bool = True) -> Bundle:
    """Load OUT/model (a folder or an ``s3://`` URI), checked against what it claims.

    Each backbone's weights are found by their recorded identity (sha256): where training read
    them (the recorded hint), in ``weights_dirs``, $DERMRAY_WEIGHTS_DIR or the Keras cache, or
    downloaded from Keras where they are its own ImageNet file; a file with another hash is never
    used. ``warn_random``: warn (once, here) that a bundle on random weights predicts nothing
    meaningful on real images (a Ray actor loading it again passes False).
    """
    directory = Path(model)
    if storage.is_remote(model):
        directory = Path(tempfile.mkdtemp(prefix="dermray-model-"))
        atexit.register(storage.remove, directory, tempfile.gettempdir(), "downloaded bundle",
                        logging.DEBUG, best_effort=True)
        storage.download_dir(model, directory)
    where = storage.display(model)
    spec = read_spec(directory, where)
    weights = {b.name: find_weights(b.name, b.weights_identity, b.weights_name,
                                    [*weights_dirs], hint=b.weights_hint,
                                    origin=b.weights_origin) for b in spec.backbones}
    try:
        if spec.is_ensemble:
            head = EnsembleHead.load(directory / "head", [m.family for m in spec.members],
                                     [m.weight for m in spec.members])
        else:
            head = load_head(spec.family, directory / "head")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile, DermrayError) as exc:
        raise BundleError(f"{where}/head cannot be loaded as a '{spec.family}' head "
                          f"({type(exc).__name__}: {str(exc)[:200]}). The export wrote a "
                          "damaged head: export the bundle again.") from None
    if spec.is_ensemble:
        for i, (member, member_head) in enumerate(zip(spec.members, head.heads, strict=True)):
            check_head(spec, member_head, f"{where} (member {i}, head/{i})", member.features,
                       member.family)
    else:
        check_head(spec, head, where)
    if warn_random and spec.random_backbones:
        logger.warning("the model %s runs its backbone(s) %s on seeded random weights "
                       "(weights: none, as the demo trains): its predictions on real images "
                       "are meaningless. Train with ImageNet weights for real use.", where,
                       ", ".join(spec.random_backbones))
    return Bundle(spec=spec, head=head, directory=directory, weights=weights)


def expected_inputs(spec: BundleSpec, features: str | None = None) -> int:
    """How many inputs the head must take: the backbones' feature sizes (+ the metadata
    encoding), or the pixels of an image family. ``features``: an ensemble member's."""
    if spec.takes_images:
        return spec.image_size * spec.image_size * 3
    names, meta = parse_features(features or spec.features, maps=True)
    size = sum(get_spec(name).dim(spec.image_size) for name in names)
    if meta:
        size += metadata_matrix(pd.DataFrame({"age": [np.nan], "sex": ["unknown"],
                                              "localization": ["unknown"]})).shape[1]
    return size


def check_head(spec: BundleSpec, head: Any, where: str, features: str | None = None,
               family: str | None = None) -> None:
    """The head takes what the bundle's backbones give at its image size (``features`` and
    ``family``: an ensemble member's), and gives the 7 classes."""
    want = expected_inputs(spec, features)
    if getattr(head, "n_features_in_", want) != want:
        raise BundleError(
            f"{where}: the head takes {head.n_features_in_} inputs, but {BUNDLE_FILE}'s backbones "
            f"and features ({features or spec.features}) give {want}. The bundle was edited or "
            "damaged: export it again.")
    if getattr(head, "image_size", spec.image_size) != spec.image_size:
        raise BundleError(f"{where}: the head takes {head.image_size}-pixel images, but "
                          f"{BUNDLE_FILE} says {spec.image_size}. Export the bundle again.")
    classes = getattr(head, "classes_", None)
    if classes is not None and len(classes) != len(spec.labels):
        raise BundleError(f"{where}: the head gives {len(classes)} classes, {BUNDLE_FILE}'s "
                          f"labels name {len(spec.labels)}. Export the bundle again.")
    check_head_numbers(spec, head, where, want, family or spec.family)


def check_head_numbers(spec: BundleSpec, head: Any, where: str, want: int,
                       family: str) -> None:
    """The head's numbers are finite and of the declared shapes: each numeric array a head
    declares (``Head.declared_arrays``: its shape from the bundle's feature count and its 7
    classes), every weight of a Keras head's model; and a head on features gives finite
    probabilities that sum to 1 on one input of zeros (an exporter that wrote NaN anywhere,
    a tree's leaves included). The content hash cannot tell: an exporter's own bug is hashed
    with the rest."""
    target = f"{where}/head/{getattr(head, 'arrays_file', '') or ''}".rstrip("/")
    declared = getattr(head, "declared_arrays", lambda *a: {})(want, len(spec.labels))
    for name, (array, shape) in declared.items():
        array = np.asarray(array)
        if array.shape != shape:
            raise BundleError(f"{target}: '{name}' has shape {array.shape}, but {BUNDLE_FILE} "
                              f"declares {want} features and {len(spec.labels)} classes, so "
                              f"{shape}. The export wrote a damaged head: export it again.")
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
            bad = (int(np.size(array) - np.isfinite(array).sum())
                   if np.issubdtype(array.dtype, np.number) else "all")
            raise BundleError(f"{target}: '{name}' holds {bad} value(s) that are not finite "
                              "numbers (NaN or inf). The export wrote a damaged head: export it "
                              "again.")
    model = getattr(head, "model_", None)
    for weight in getattr(model, "weights", []) if model is not None else []:
        values = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            raise BundleError(f"{where}/head/{getattr(head, 'model_file', 'model')}: the weight "
                              f"'{getattr(weight, 'path', getattr(weight, 'name', '?'))}' holds "
                              "values that are not finite (NaN or inf). The export wrote a "
                              "damaged head: export it again.")
    if get_family(family).input == EMBEDDINGS:
        proba = np.asarray(head.predict_proba(np.zeros((1, want), dtype=np.float32)))
        if (proba.shape != (1, len(spec.labels)) or not np.all(np.isfinite(proba))
                or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-3)):
            raise BundleError(f"{where}/head: on an input of zeros it gives {proba.tolist()}, not "
                              f"{len(spec.labels)} finite probabilities that sum to 1. The export "
                              "wrote a damaged head: export it again.")
