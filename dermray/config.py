"""Stage configs: one frozen dataclass per stage, loaded from YAML plus CLI overrides.

A YAML file has one mapping per stage (``data:``, ``extract:``, ``search:``); the keys are the
dataclass field names, and the CLI flags use the same names (``image_size`` <-> ``--image-size``).
Unknown keys and bad values are rejected when loaded, with the key and the value in the message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dermray.domain import SYNTH_MIN_N
from dermray.errors import ConfigError, check, check_unique
from dermray.models.backbones import (
    BACKBONES,
    IMAGE_SIZE,
    IMAGE_SIZE_RULE,
    valid_image_size,
    weights_layer_problem,
)
from dermray.models.features import parse_features
from dermray.models.heads import EMBEDDINGS, FAMILIES, FAMILY_SPECS


@dataclass(frozen=True)
class DataConfig:
    """Catalog and split: where the metadata and images are, how to split them."""

    metadata: str = ""
    images: tuple[str, ...] = ()
    out: str = "out"
    seed: int = 0
    train_frac: float = 0.70
    val_frac: float = 0.15
    test_frac: float = 0.15
    # with no metadata given, generate this many synthetic images under OUT/synthetic
    synth_n: int = 0

    def __post_init__(self) -> None:
        for key in ("train_frac", "val_frac", "test_frac"):
            value = getattr(self, key)
            check(0.0 < value < 1.0, "data", key, value, "a fraction strictly between 0 and 1")
        total = self.train_frac + self.val_frac + self.test_frac
        check(abs(total - 1.0) < 1e-6, "data", "train_frac+val_frac+test_frac", total,
               "1.0 (the three fractions must add up)")
        check(self.seed >= 0, "data", "seed", self.seed, "a non-negative integer")
        check(self.synth_n == 0 or self.synth_n >= SYNTH_MIN_N, "data", "synth_n", self.synth_n,
              f"0 (off) or at least {SYNTH_MIN_N} (4 lesions per class)")
        check(bool(self.metadata) or self.synth_n > 0, "data", "metadata", self.metadata,
               "a metadata CSV path (or set data.synth_n for synthetic data)")


@dataclass(frozen=True)
class ExtractConfig:
    """Feature extraction: backbones, weights, input size, augmentation plan, Ray layout."""

    manifest: str = ""
    out: str = "out"
    backbones: tuple[str, ...] = ("resnet50", "vgg19")
    # backbone name -> "imagenet" | "none" | a weights file path
    weights: dict[str, str] = field(default_factory=dict)
    image_size: int = IMAGE_SIZE
    batch_size: int = 32
    augment: bool = True
    # views per class the train split is brought up to (0: the largest class's image count)
    target_per_class: int = 0
    max_views_per_image: int = 8
    # test-time augmentation: extra views (flips/rotations) of val and test images
    tta_views: int = 0
    seed: int = 0
    # Ray layout: num_actors > 0 fixes the pool's size. With 0 the pool autoscales: from the
    # actors that fit now (one per GPU present, at least one; one per node without GPUs) up to
    # max_actors, as the cluster autoscaler adds GPU nodes
    num_actors: int = 0
    max_actors: int = 0
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # 0: all cores of the node
    num_gpus_per_actor: float = 0.0  # 0: auto (1 where the cluster has GPUs)
    decode_batch_size: int = 16
    mixed_precision: bool = False
    jit_compile: bool = True
    # who writes the Parquet: "actors" (each embedding actor, straight into OUT), "driver" (the
    # job's driver, so OUT can be a local folder of the head on a multi-node cluster), or "auto":
    # the actors when OUT is s3:// or the cluster has one node, else the driver
    write_from: str = "auto"

    def __post_init__(self) -> None:

        check(len(self.backbones) > 0, "extract", "backbones", self.backbones, "non-empty")
        check_unique("extract", "backbones", self.backbones)
        for name in self.backbones:
            check(name in BACKBONES, "extract", "backbones", name,
                   f"one of {sorted(BACKBONES)}")
        for name, value in self.weights.items():
            check(name in BACKBONES, "extract", "weights", name, f"keyed by one of {sorted(BACKBONES)}")
            check(isinstance(value, str) and value != "", "extract", f"weights.{name}", value,
                   "'imagenet', 'none' or a weights file path")
        check(valid_image_size(self.image_size), "extract", "image_size", self.image_size,
              IMAGE_SIZE_RULE)
        for key in ("batch_size", "max_views_per_image", "decode_batch_size"):
            check(getattr(self, key) >= 1, "extract", key, getattr(self, key), ">= 1")
        for key in ("target_per_class", "tta_views", "seed", "num_actors", "max_actors",
                    "threads_per_actor"):
            check(getattr(self, key) >= 0, "extract", key, getattr(self, key), ">= 0")
        check(self.tta_views <= 7, "extract", "tta_views", self.tta_views,
               "at most 7 (the dihedral group has 8 views)")
        check(self.write_from in ("auto", "actors", "driver"), "extract", "write_from",
               self.write_from, "'auto', 'actors' or 'driver'")
        check(self.cpus_per_actor > 0, "extract", "cpus_per_actor", self.cpus_per_actor, "> 0")
        check(self.num_gpus_per_actor >= 0, "extract", "num_gpus_per_actor",
               self.num_gpus_per_actor, ">= 0")

    def weights_for(self, backbone: str) -> str:
        return self.weights.get(backbone, "imagenet")


def _default_families() -> tuple[str, ...]:

    return FAMILIES


@dataclass(frozen=True)
class SearchConfig:
    """The head search: which families and features, how many trials, with what resources.

    The keys of one family (``mlp_max_epochs``, ``xgb_max_estimators``, ``finetune_*``) are
    read and validated by that family's spec (``dermray.models.heads``), not here.
    """

    out: str = "out"
    families: tuple[str, ...] = field(default_factory=_default_families)
    features: tuple[str, ...] = ("resnet50", "vgg19", "resnet50+vgg19")
    num_samples: int = 24
    algorithm: str = "tpe"  # tpe (Optuna) | random
    max_concurrent: int = 2
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_finetune_trial: float = -1.0  # -1: one GPU where the cluster has GPUs, else 0
    grace_period: int = 3
    max_t: int = 100
    max_failures: int = 1
    storage_path: str = ""  # default OUT/tune; s3://bucket/prefix on a cluster
    experiment: str = "heads"
    # first trials to run, one per family, so that every family is tried even on small budgets
    seed_each_family: bool = True
    # a trial sequence that does not depend on timing: the searcher suggests max_concurrent
    # trials at a time and waits for the whole batch before the next, and no trial is stopped
    # early (ASHA's cuts depend on which trial reports first); same seed, same trials
    deterministic: bool = False
    # a wall-clock cap on the search in minutes (Tune's time_budget_s), 0 for none: when it is
    # spent Tune starts no new trial and stops the running ones at their last report; the
    # winner is still picked by validation accuracy among the trials that reported (one
    # stopped before its final report is refitted at export). Sizes a laptop run; the trials
    # then depend on timing, so it cannot be combined with ``deterministic``
    time_budget_minutes: float = 0.0
    mlp_max_epochs: int = 60
    xgb_max_estimators: int = 400
    finetune_backbones: tuple[str, ...] = ("resnet50",)
    finetune_weights: dict[str, str] = field(default_factory=dict)
    finetune_image_size: int = 224
    finetune_epochs: int = 10
    finetune_max_train_images: int = 0  # 0: all (a cluster); small on a laptop
    # the cached-activation fine-tune (dermray/models/heads/cached.py): which activation map it trains
    # on, the weights its top block starts from ("": the extraction's), epochs, flip TTA
    cached_cnn_features: str = "resnet50_c5b2"
    cached_cnn_weights: str = ""
    cached_cnn_epochs: int = 8
    cached_cnn_tta: bool = True
    # GPUs per cached_cnn trial where the cluster has GPUs (-1: a quarter, so that 4 trials
    # share one; the maps are small), 0 on a CPU-only Ray
    cached_cnn_gpus: float = -1.0
    # the melanoma operating point: the validation sensitivity its threshold must reach
    melanoma_target: float = 0.90
    # optional MLflow tracking through Tune's MLflowLoggerCallback: a server (http(s)://...) or a
    # local file store (file:///abs/path); "" is off (see dermray/stages/tracking.py)
    mlflow_tracking_uri: str = ""

    def __post_init__(self) -> None:
        # local: both import this module

        known = ", ".join(FAMILY_SPECS)
        check(len(self.families) > 0, "search", "families", self.families,
              f"a non-empty list of {known}")
        for fam in self.families:
            check(fam in FAMILY_SPECS, "search", "families", fam, f"one of {known}")
        check_unique("search", "families", self.families)
        check_unique("search", "features", self.features)
        check_unique("search", "finetune_backbones", self.finetune_backbones)
        for spec in self.features:  # resnet50+resnet50 would fuse one embedding with itself
            parts = spec.split("+")
            check(len(set(parts)) == len(parts), "search", "features", spec,
                  "'+'-joined names, each at most once")
        on_embeddings = [f for f in self.families if FAMILY_SPECS[f].input == EMBEDDINGS]
        check(not on_embeddings or len(self.features) > 0, "search", "features",
              self.features, "non-empty when an embedding family is searched")
        for spec in self.features:
            parse_features(spec)
        check(self.algorithm in ("tpe", "random"), "search", "algorithm", self.algorithm,
              "'tpe' or 'random'")
        for key in ("num_samples", "max_concurrent", "grace_period", "max_t"):
            check(getattr(self, key) >= 1, "search", key, getattr(self, key), ">= 1")
        check(self.time_budget_minutes >= 0, "search", "time_budget_minutes",
              self.time_budget_minutes, ">= 0 (0: no cap)")
        check(not (self.deterministic and self.time_budget_minutes), "search",
              "time_budget_minutes", self.time_budget_minutes,
              "0 when search.deterministic is true (a time cap makes the trials depend on timing)")
        check(self.max_failures >= 0, "search", "max_failures", self.max_failures, ">= 0")
        check(self.cpus_per_trial > 0, "search", "cpus_per_trial", self.cpus_per_trial, "> 0")
        check(0.0 < self.melanoma_target <= 1.0, "search", "melanoma_target",
              self.melanoma_target, "a sensitivity in (0, 1]")
        check(not self.mlflow_tracking_uri or "://" in self.mlflow_tracking_uri, "search",
              "mlflow_tracking_uri", self.mlflow_tracking_uri,
              "'' (off) or a URI: http(s)://server or file:///absolute/path")
        for family in FAMILY_SPECS.values():  # every family's own keys, searched or not
            family.check_config(self)


# every section of every shipped config, in one place: no command depends on which stage
# modules happen to be imported
SECTIONS: dict[str, type] = {"data": DataConfig, "extract": ExtractConfig, "search": SearchConfig}


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = f"{section}.{key}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(section, key, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list. Got {value!r} instead.")
        return tuple(_coerce(section, key, v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping. Got {value!r} instead.")
        return {str(k): _coerce(section, f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false. Got {value!r} instead.")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where} must be an integer. Got {value!r} instead.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer. Got {value!r} instead.") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number. Got {value!r} instead.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number. Got {value!r} instead.") from None
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string. Got {value!r} instead.")
        return str(value)
    return value


def build_section(name: str, values: Mapping[str, Any] | None) -> Any:
    """Build one stage's config from a mapping, rejecting unknown keys and bad values."""
    cls = SECTIONS[name]
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) in section '{name}': {', '.join(unknown)}. Known keys: {', '.join(names)}."
        )
    kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file: a mapping of section name -> mapping of keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections. Got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown section(s) in {path}: {', '.join(unknown)}. Known sections: {', '.join(SECTIONS)}."
        )
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"Section '{section}' in {path} must be a mapping. Got {values!r}.")
    return raw


def load_section(name: str, path: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """One stage's config: the file's section (if a file is given), then CLI overrides on top.

    Overrides whose value is None (flags the user did not pass) are ignored.
    """
    values: dict[str, Any] = {}
    if path:
        values.update(read_yaml(path).get(name) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_section(name, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def load_all(path: str | Path | None,
             overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Every section of a config file, each with its CLI overrides, built and validated at once.

    Commands call this before any stage runs, so that a bad value in a later stage's section
    (``search.num_samples: 0``) is refused before the first stage starts, not after it. Every
    section's problem is reported in one message. A section only in ``overrides`` (the command's
    own, with no file or no such section in it) is built too.
    """
    overrides = overrides or {}
    raw = read_yaml(path) if path else {}
    built: dict[str, Any] = {}
    problems: list[str] = []
    for name in SECTIONS:
        if name not in raw and name not in overrides:
            continue
        values = dict(raw.get(name) or {})
        values.update({k: v for k, v in (overrides.get(name) or {}).items() if v is not None})
        try:
            built[name] = build_section(name, values)
        except ConfigError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(f"{path}: {problems[0]}" if path else problems[0])
    if problems:
        raise ConfigError(f"{path or 'the command line'} has {len(problems)} problems:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return built


# the first bytes of the two weights formats Keras loads: HDF5 (.h5, .weights.h5) and zip (.keras)
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
WEIGHTS_FIX = ("pass a Keras weights file of that backbone (the keras.applications 'notop' .h5, "
               "or a .keras file), 'imagenet' (downloads on a machine with internet) or 'none' "
               "(seeded random weights)")


def check_weights_file(key: str, value: str) -> None:
    """A weights value that names a file must name one Keras can load: HDF5, or a .keras zip.

    Checked in the driver, before Ray or any actor starts: otherwise a text file named .h5 ends
    in an actor's traceback after every retry. Whether the layers fit the architecture is
    checked by ``_check_architecture`` (layer names of a backbone's .h5 file).
    """
    if value.lower() in ("imagenet", "none"):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}: weights file {value} {what}; {WEIGHTS_FIX}.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read weights file {value} ({exc.strerror}); "
                          f"{WEIGHTS_FIX}.") from None
    if path.suffix == ".keras" or head.startswith(ZIP_MAGIC):
        _check_keras_zip(key, value, path)
        return
    if head != HDF5_MAGIC:
        size = path.stat().st_size
        found = "empty" if size == 0 else f"{size} bytes starting {head[:8]!r}"
        raise ConfigError(f"{key}: weights file {value} is not an HDF5 file ({found}); "
                          f"{WEIGHTS_FIX}.")
    _check_hdf5(key, value, path)


def _check_hdf5(key: str, value: str, path: Path) -> None:
    """Open the file with h5py (a Keras dependency): a truncated or empty file is refused."""
    try:
        import h5py
    except ImportError:  # no h5py: the magic bytes are all that can be checked here
        return
    try:
        with h5py.File(path, "r") as f:
            empty = len(f.keys()) == 0 and len(f.attrs.get("layer_names", ())) == 0
    except OSError as exc:
        raise ConfigError(f"{key}: weights file {value} is not a readable HDF5 file "
                          f"(truncated or damaged: {str(exc)[:160]}); {WEIGHTS_FIX}.") from None
    if empty:
        raise ConfigError(f"{key}: weights file {value} is an HDF5 file that holds no layer "
                          f"weights; {WEIGHTS_FIX}.")


def _check_keras_zip(key: str, value: str, path: Path) -> None:

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"{key}: weights file {value} is not a valid .keras (zip) file "
                          f"({exc}); {WEIGHTS_FIX}.") from None
    if not any(n.endswith(".weights.h5") for n in names):
        raise ConfigError(f"{key}: weights file {value} is a zip without a *.weights.h5 inside "
                          f"(it holds {', '.join(names[:5]) or 'nothing'}); {WEIGHTS_FIX}.")


def _check_architecture(key: str, value: str, backbone: str) -> None:
    """An HDF5 weights file keyed by a backbone holds that backbone's layers."""

    path = Path(value).expanduser()
    if backbone not in BACKBONES or value.lower() in ("imagenet", "none") or path.suffix != ".h5":
        return
    try:
        problem = weights_layer_problem(backbone, path)
    except ImportError:  # no h5py: found when the model is built
        return
    if problem:
        raise ConfigError(f"{key}: weights file {value} does not fit {backbone}: {problem}; "
                          f"{WEIGHTS_FIX}.")


def check_weights_files(configs: Mapping[str, Any]) -> None:
    """Every weights file a set of configs names (fields whose name ends in ``weights``, a
    name -> value mapping or one value), checked at once; one message lists every bad file."""
    problems = []
    for section, cfg in configs.items():
        for f in dataclasses.fields(cfg):
            if not f.name.endswith("weights"):
                continue
            value = getattr(cfg, f.name)
            items = value.items() if isinstance(value, Mapping) else [("", value)]
            for name, item in items:
                if not isinstance(item, str) or not item:  # "" : the family's own default
                    continue
                key = f"{section}.{f.name}" + (f".{name}" if name else "")
                try:
                    check_weights_file(key, item)
                    _check_architecture(key, item, name)
                except ConfigError as exc:
                    problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} weights files cannot be used:\n"
                          + "\n".join(f"  - {p}" for p in problems))
