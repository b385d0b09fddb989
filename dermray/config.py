"""Stage configs: one frozen dataclass per stage, loaded from YAML plus CLI overrides.

A YAML file has one mapping per stage (``data:``, ``extract:``, ``search:``); the keys are the
dataclass field names, and the CLI flags use the same names (``image_size`` <-> ``--image-size``).
Unknown keys and bad values are rejected when loaded, with the key and the value in the message.

Every field declares, once, what it does to its stage's output (``setting(default, effect)``,
see ``dermray.io.fingerprint.EFFECTS``); a stage's fingerprint is ``output_settings(cfg)``. A head
family's own keys (``mlp_max_epochs``, ...) sit flat in the ``search:`` mapping but are declared,
validated and read by the family's spec (``dermray.models.heads.registry.Setting``), each with
its own effect; ``SearchConfig.family_settings`` holds their values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dermray.domain import SYNTH_MIN_N
from dermray.errors import ConfigError, check, check_unique
from dermray.io import yamlfile
from dermray.io.fingerprint import EFFECT, EFFECTS, INPUT, NEUTRAL, OUTPUT
from dermray.io.storage import is_component, strip_credentials
from dermray.models.backbones import (
    BACKBONES,
    IMAGE_SIZE,
    IMAGE_SIZE_RULE,
    JIT_CHOICES,
    valid_image_size,
    weights_layer_problem,
)
from dermray.models.features import parse_features
from dermray.models.heads import EMBEDDINGS, FAMILIES, FAMILY_SPECS
from dermray.models.heads.registry import family_settings

# the effect of SearchConfig.family_settings: each of its keys is declared on its family's spec
PER_SETTING = "per_setting"


def setting(default: Any = MISSING, effect: str = "", *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A config field that declares what it does to its stage's output (``effect``, one of
    ``dermray.io.fingerprint.EFFECTS``): an ``output`` field is in the stage's fingerprint, so
    changing it refuses to reuse old work; ``input`` names something the stage fingerprints by
    content; ``neutral`` changes only where or how fast it runs."""
    if effect not in (*EFFECTS, PER_SETTING):
        raise TypeError(f"setting(effect=...) must be one of {', '.join(EFFECTS)}. "
                        f"Got {effect!r} instead.")
    if factory is not None:
        return field(default_factory=factory, metadata={EFFECT: effect})
    return field(default=default, metadata={EFFECT: effect})


@dataclass(frozen=True)
class DataConfig:
    """Catalog and split: where the metadata and images are, how to split them."""

    # the catalog they make is fingerprinted by its content (the split's input)
    metadata: str = setting("", INPUT)
    images: tuple[str, ...] = setting((), INPUT)
    out: str = setting("out", NEUTRAL)
    seed: int = setting(0, OUTPUT)
    train_frac: float = setting(0.70, OUTPUT)
    val_frac: float = setting(0.15, OUTPUT)
    test_frac: float = setting(0.15, OUTPUT)
    # with no metadata given, generate this many synthetic images under OUT/synthetic
    synth_n: int = setting(0, INPUT)

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

    # fingerprinted by the manifest's content hash
    manifest: str = setting("", INPUT)
    out: str = setting("out", NEUTRAL)
    # each backbone writes its own folder, fingerprinted with its name
    backbones: tuple[str, ...] = setting(("resnet50", "vgg19"), INPUT)
    # backbone name -> "imagenet" | "none" | a weights file path (fingerprinted by sha256)
    weights: dict[str, str] = setting(factory=dict, effect=INPUT)
    image_size: int = setting(IMAGE_SIZE, OUTPUT)
    batch_size: int = setting(32, NEUTRAL)
    augment: bool = setting(True, OUTPUT)
    # views per class the train split is brought up to (0: the largest class's image count)
    target_per_class: int = setting(0, OUTPUT)
    max_views_per_image: int = setting(8, OUTPUT)
    # test-time augmentation: extra views (flips/rotations) of val and test images
    tta_views: int = setting(0, OUTPUT)
    seed: int = setting(0, OUTPUT)
    # Ray layout: num_actors > 0 fixes the pool's size. With 0 the pool autoscales: from the
    # actors that fit now (one per GPU present, at least one; one per node without GPUs) up to
    # max_actors, as the cluster autoscaler adds GPU nodes
    num_actors: int = setting(0, NEUTRAL)
    max_actors: int = setting(0, NEUTRAL)
    cpus_per_actor: float = setting(1.0, NEUTRAL)
    threads_per_actor: int = setting(0, NEUTRAL)  # 0: all cores of the node
    num_gpus_per_actor: float = setting(0.0, NEUTRAL)  # 0: auto (1 where the cluster has GPUs)
    decode_batch_size: int = setting(16, NEUTRAL)
    # Ray Data calls an embedding actor runs at once: with 2, one batch is decoded (where the
    # decode is fused into the actor: one node without GPUs) and its part files written while
    # the network embeds another (the network still takes one batch at a time); 1: each batch's
    # decode, network pass and writing in turn (benchmarks/extract_breakdown.py --calls-per-actor)
    calls_per_actor: int = setting(2, NEUTRAL)
    mixed_precision: bool = setting(False, OUTPUT)
    # XLA for the networks' calls: true, false, or auto (on GPUs every network; on CPU those
    # whose registry entry measured XLA faster: ResNet50 yes, VGG19 no). Neutral: XLA and the
    # plain graph differ in the last bits only, like two GPU models (docs/performance.md)
    jit_compile: str = setting("auto", NEUTRAL)
    # who writes the Parquet: "actors" (each embedding actor, straight into OUT), "driver" (the
    # job's driver, so OUT can be a local folder of the head on a multi-node cluster), or "auto":
    # the actors when OUT is s3:// or the cluster has one node, else the driver
    write_from: str = setting("auto", NEUTRAL)

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
        for key in ("batch_size", "max_views_per_image", "decode_batch_size", "calls_per_actor"):
            check(getattr(self, key) >= 1, "extract", key, getattr(self, key), ">= 1")
        for key in ("target_per_class", "tta_views", "seed", "num_actors", "max_actors",
                    "threads_per_actor"):
            check(getattr(self, key) >= 0, "extract", key, getattr(self, key), ">= 0")
        check(self.tta_views <= 7, "extract", "tta_views", self.tta_views,
               "at most 7 (the dihedral group has 8 views)")
        check(self.write_from in ("auto", "actors", "driver"), "extract", "write_from",
               self.write_from, "'auto', 'actors' or 'driver'")
        # true/false from Python or YAML, or "auto"
        object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())
        check(self.jit_compile in JIT_CHOICES, "extract", "jit_compile", self.jit_compile,
              f"one of {', '.join(JIT_CHOICES)}")
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

    The keys of one family (``mlp_max_epochs``, ``xgb_max_estimators``, ``finetune_*``,
    ``cached_cnn_*``) are not fields: each family's spec declares, validates and reads them
    (``dermray.models.heads.registry.Setting``), and ``family_settings`` holds their values.
    """

    # OUT: the embeddings read there are fingerprinted by their own fingerprints' keys
    out: str = setting("out", INPUT)
    families: tuple[str, ...] = setting(effect=OUTPUT, factory=_default_families)
    features: tuple[str, ...] = setting(("resnet50", "vgg19", "resnet50+vgg19"), OUTPUT)
    num_samples: int = setting(24, OUTPUT)
    algorithm: str = setting("tpe", OUTPUT)  # tpe (Optuna) | random
    max_concurrent: int = setting(2, OUTPUT)
    seed: int = setting(0, OUTPUT)
    cpus_per_trial: float = setting(1.0, NEUTRAL)
    grace_period: int = setting(3, OUTPUT)
    max_t: int = setting(100, OUTPUT)
    max_failures: int = setting(1, NEUTRAL)
    # default OUT/tune; s3://bucket/prefix on a cluster
    storage_path: str = setting("", NEUTRAL)
    experiment: str = setting("heads", NEUTRAL)
    # first trials to run, one per family, so that every family is tried even on small budgets
    seed_each_family: bool = setting(True, OUTPUT)
    # a trial sequence that does not depend on timing: the searcher suggests max_concurrent
    # trials at a time and waits for the whole batch before the next, and no trial is stopped
    # early (ASHA's cuts depend on which trial reports first); same seed, same trials
    deterministic: bool = setting(False, OUTPUT)
    # a wall-clock cap on the search in minutes (Tune's time_budget_s), 0 for none: when it is
    # spent Tune starts no new trial and stops the running ones at their last report; the
    # winner is still picked by validation accuracy among the trials that reported (one
    # stopped before its final report is refitted at export). Sizes a laptop run; the trials
    # then depend on timing, so it cannot be combined with ``deterministic``
    time_budget_minutes: float = setting(0.0, OUTPUT)
    # the melanoma operating point: the validation sensitivity its threshold must reach
    melanoma_target: float = setting(0.90, OUTPUT)
    # a soft-vote ensemble of the best trial of each (family, backbones) as a candidate beside
    # the trials (dermray.models.ensemble; chosen only when its out-of-fold validation accuracy
    # beats the best trial's); false: the best trial is exported, as before ensembles
    ensemble: bool = setting(True, OUTPUT)
    # optional MLflow tracking through Tune's MLflowLoggerCallback: a server (http(s)://...) or a
    # local file store (file:///abs/path); "" is off (see dermray/stages/tracking.py)
    mlflow_tracking_uri: str = setting("", NEUTRAL)
    # every registered family's own keys -> value (flat keys, as in YAML); filled with their
    # defaults and validated on construction. Not a YAML key itself
    family_settings: dict[str, Any] = setting(effect=PER_SETTING, factory=dict)

    def __post_init__(self) -> None:
        known = ", ".join(FAMILY_SPECS)
        check(len(self.families) > 0, "search", "families", self.families,
              f"a non-empty list of {known}")
        for fam in self.families:
            check(fam in FAMILY_SPECS, "search", "families", fam, f"one of {known}")
        check_unique("search", "families", self.families)
        check_unique("search", "features", self.features)
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
        check(is_component(self.experiment), "search", "experiment", self.experiment,
              "one folder name (not empty, '.' or '..'; no '/' or '\\'): it is a folder inside "
              "search.storage_path")
        check(0.0 < self.melanoma_target <= 1.0, "search", "melanoma_target",
              self.melanoma_target, "a sensitivity in (0, 1]")
        check(not self.mlflow_tracking_uri or "://" in self.mlflow_tracking_uri, "search",
              "mlflow_tracking_uri", self.mlflow_tracking_uri,
              "'' (off) or a URI: http(s)://server or file:///absolute/path")
        # every family's own keys, searched or not: converted to their declared types, defaults
        # filled in, then checked by their family's spec
        declared = family_settings()
        given = dict(self.family_settings)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise unknown_keys("search", unknown, yaml_keys(SearchConfig))
        values = {key: _coerce("search", key, given[key], s.type) if key in given
                  else s.default_value() for key, s in declared.items()}
        object.__setattr__(self, "family_settings", values)
        for family in FAMILY_SPECS.values():
            family.check_settings(values)


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


def _per_setting(f: dataclasses.Field) -> bool:
    return f.metadata.get(EFFECT) == PER_SETTING


def effects(cfg: Any) -> dict[str, str]:
    """Each YAML key of a stage's config (a class or an instance) -> its declared effect on the
    stage's output; a family's own keys with the effect their family declares. A field that
    declares none is a programming error, raised here (and by a unit test)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        effect = f.metadata.get(EFFECT)
        if effect == PER_SETTING:
            out.update({key: s.effect for key, s in family_settings().items()})
        elif effect in EFFECTS:
            out[f.name] = effect
        else:
            name = cfg.__name__ if isinstance(cfg, type) else type(cfg).__name__
            raise TypeError(f"{name}.{f.name} does not declare what it does to its stage's "
                            "output: declare it with dermray.config.setting(default, effect).")
    return out


def output_settings(cfg: Any) -> dict[str, Any]:
    """The settings that change a stage's output, with their values (as ``config_to_dict``
    gives them): what the stage's fingerprint holds."""
    declared = effects(cfg)
    return {k: v for k, v in config_to_dict(cfg).items() if declared[k] == OUTPUT}


def yaml_keys(cls: type) -> list[str]:
    """The keys a section accepts: its fields, and for the search every family's own keys."""
    keys = [f.name for f in dataclasses.fields(cls) if not _per_setting(f)]
    if any(_per_setting(f) for f in dataclasses.fields(cls)):
        clash = set(keys) & set(family_settings())
        if clash:
            raise TypeError(f"family setting(s) {', '.join(sorted(clash))} clash with "
                            f"{cls.__name__}'s own keys")
        keys += list(family_settings())
    return keys


def unknown_keys(where: str, unknown: Iterable[str], known: list[str],
                 what: str = "key(s) in section") -> ConfigError:
    """The error for unknown names: each with the closest known one, when one is close."""
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        named.append(f"{key} (did you mean {close[0]}?)" if close else key)
    kinds = "keys" if what.startswith("key") else "sections"
    return ConfigError(f"Unknown {what} {where}: {', '.join(named)}. "
                       f"Known {kinds}: {', '.join(known)}.")


def build_section(name: str, values: Mapping[str, Any] | None) -> Any:
    """Build one stage's config from a mapping, rejecting unknown keys and bad values; a head
    family's own keys go to ``family_settings`` (converted and checked there)."""
    cls = SECTIONS[name]
    values = strip_credentials(dict(values or {}))  # no URI's credentials in a config
    hints = typing.get_type_hints(cls)
    known = yaml_keys(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise unknown_keys(f"'{name}'", unknown, known)
    own = family_settings()
    kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in values.items() if k not in own}
    per_family = {k: v for k, v in values.items() if k in own}
    if per_family:
        kwargs["family_settings"] = per_family
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file: a mapping of section name -> mapping of keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        raw = yamlfile.load(path) or {}  # bounded: aliases, size, duplicate keys
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections. Got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise unknown_keys(str(path), unknown, list(SECTIONS), what="section(s) in")
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
    """A JSON-friendly dict of a config (tuples become lists), flat as in YAML: a family's own
    keys beside the search's (read through their declarations)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if _per_setting(f):
            out.update({key: s.read(cfg) for key, s in family_settings().items()})
        else:
            out[f.name] = getattr(cfg, f.name)
    return {k: list(v) if isinstance(v, tuple) else copy.deepcopy(v) for k, v in out.items()}


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
    """Every weights file a set of configs names (keys whose name ends in ``weights``, a
    name -> value mapping or one value), checked at once; one message lists every bad file."""
    problems = []
    for section, cfg in configs.items():
        for field_name, value in config_to_dict(cfg).items():  # a family's keys too
            if not field_name.endswith("weights"):
                continue
            items = value.items() if isinstance(value, Mapping) else [("", value)]
            for name, item in items:
                if not isinstance(item, str) or not item:  # "" : the family's own default
                    continue
                key = f"{section}.{field_name}" + (f".{name}" if name else "")
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
