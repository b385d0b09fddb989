"""The head-family registry, timm-style: each family registers a ``FamilySpec`` beside its class,
and the search, selection, bundle and predict stages ask the spec instead of branching on names.

A spec holds everything about a family: its head class, the input it takes, its search space and
first point, its own config keys (``Setting``: declared, validated and read here, not by
``SearchConfig`` fields), the packages it needs, its resources per trial, its device parameter,
and whether it reports per iteration (so that ASHA can stop it early). How a fitted head is
explained is the head's own answer (``Head.differentiable_scores``): it depends on the fitted
state, and a head loaded from a bundle answers without its spec.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dermray.errors import check, lookup
from dermray.io.fingerprint import EFFECTS
from dermray.models.heads.base import Head, HeadError, Rule

if TYPE_CHECKING:
    from dermray.config import SearchConfig

# what a head is fitted on: rows of backbone embeddings (a trial also picks a feature spec),
# decoded images (uint8, N x S x S x 3) read from the manifest, or a frozen network's cached
# activation maps (float16, N x H x W x C; OUT/activations, see dermray.models.embeddings)
EMBEDDINGS = "embeddings"
IMAGES = "images"
ACTIVATIONS = "activations"
INPUT_KINDS = (EMBEDDINGS, IMAGES, ACTIVATIONS)


def at_least(low: float, note: str = "") -> Rule:
    """A number >= ``low`` (the value is already of the setting's type when checked)."""
    return Rule(lambda v: v >= low, f">= {low}" + (f" ({note})" if note else ""))


# a GPU share per trial: -1 lets the family choose from the cluster, else a fixed share
GPU_SHARE = Rule(lambda v: v == -1 or v >= 0, "-1 (auto) or a share >= 0")


@dataclass(frozen=True)
class Setting:
    """One search-config key that only a family reads: ``search.<key>`` in a YAML file, flat
    beside the search's own keys (``mlp_max_epochs: 20``), kept per family on the search config
    (``SearchConfig.family_settings``) and read with ``read(cfg)``.

    Attributes:
        key: the YAML key; unique across families and the search's own keys.
        default: its value when the config does not set it.
        type: the annotation a YAML or CLI value is converted to (``int``, ``tuple[str, ...]``,
            ``dict[str, str]``, ...), as for a config field.
        effect: what it does to the search's output (``dermray.io.fingerprint.EFFECTS``): an
            ``output`` setting is part of the search's fingerprint, so changing it refuses to
            reuse an old experiment.
        rule: what a value must be; checked when the search config is loaded.
        doc: one line for the reader of a config.
    """

    key: str
    default: Any
    type: Any
    effect: str
    rule: Rule | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.key):
            raise HeadError(f"A setting's key must be a lower-case identifier. Got {self.key!r}.")
        if self.effect not in EFFECTS:
            raise HeadError(f"The 'effect' of setting {self.key!r} must be one of "
                            f"{', '.join(EFFECTS)}. Got {self.effect!r} instead.")
        if self.rule is not None and not self.rule.ok(self.default):
            raise HeadError(f"The default of setting {self.key!r} must be {self.rule.must}. "
                            f"Got {self.default!r} instead.")

    def default_value(self) -> Any:
        """A fresh copy of the default (a dict default is not shared between configs)."""
        return copy.deepcopy(self.default)

    def check(self, value: Any) -> None:
        """Raise ConfigError (``search.<key> must be ...``) unless ``value`` keeps the rule."""
        if self.rule is not None:
            check(self.rule.ok(value), "search", self.key, value, self.rule.must)

    def read(self, cfg: SearchConfig) -> Any:
        """This setting's value in a search config (its default where the config was built
        before the family was registered)."""
        values = cfg.family_settings
        return values[self.key] if self.key in values else self.default_value()


def no_fixed_params(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    return {}


def cpu_trial(cfg: SearchConfig, cluster_has_gpus: bool) -> dict[str, float]:
    """One trial's resources for a CPU family: ``search.cpus_per_trial`` CPUs, no GPU."""
    return {"CPU": cfg.cpus_per_trial, "GPU": 0}


def no_device(has_gpu: bool) -> dict[str, Any]:
    return {}


def all_train_images(cfg: SearchConfig) -> int:
    return 0


@dataclass(frozen=True)
class FamilySpec:
    """What a head family is, for every stage that uses one.

    Attributes:
        name: the family name; its search parameters are prefixed ``<name>_``.
        head_class: the class (scikit-learn contract, plus ``save`` / ``load``).
        space: ``space(trial, cfg)`` suggests the family's parameters on an Optuna trial
            (define-by-run), each named ``<name>_<constructor argument>``.
        first_point: ``first_point(cfg)``: the family's sensible first trial (same keys).
        input: ``embeddings`` or ``images`` (see ``INPUT_KINDS``).
        fixed_params: ``fixed_params(cfg, params)``: constructor arguments taken from the search
            config rather than searched (epochs, estimators, seed, ...).
        resources: ``resources(cfg, cluster_has_gpus)``: ``{"CPU": n, "GPU": g}`` per trial.
        device_params: ``device_params(has_gpu)``: constructor arguments that choose the device,
            given whether the trial holds a GPU (heads never ask Ray themselves).
        iterative: reports validation metrics per iteration (epochs, boosting rounds).
        settings: the search-config keys only this family reads (``Setting``): declared,
            validated and read here; the search config accepts them because they are here.
        packages: the modules the family needs beyond dermray's core dependencies (import
            names, looked up before Ray starts: ``dermray.installed``).
        image_size: for ``images`` families, the input size from the config.
        max_train_images: for ``images`` families, how many train images to use (0: all).
        activations: for ``activations`` families, ``activations(cfg)``: the activation-map
            backbone (``resnet50_c5b2``) whose cached maps the family trains on.
        metadata: for ``activations`` families, ``metadata(cfg)``: whether patient metadata
            joins the maps, per option: ``(False,)`` (the default), ``(True,)``, or both, which
            the family's space searches as its ``<name>_meta`` parameter. Each option is an
            input: ``<backbone>`` or ``<backbone>+meta`` (``dermray.models.features``).
    """

    name: str
    head_class: type[Head]
    space: Callable[[Any, SearchConfig], None]
    first_point: Callable[[SearchConfig], dict[str, Any]]
    input: str = EMBEDDINGS
    fixed_params: Callable[[SearchConfig, dict[str, Any]], dict[str, Any]] = no_fixed_params
    resources: Callable[[SearchConfig, bool], dict[str, float]] = cpu_trial
    device_params: Callable[[bool], dict[str, Any]] = no_device
    iterative: bool = False
    settings: tuple[Setting, ...] = ()
    packages: tuple[str, ...] = ()
    image_size: Callable[[SearchConfig], int] | None = None
    max_train_images: Callable[[SearchConfig], int] = all_train_images
    activations: Callable[[SearchConfig], str] | None = None
    metadata: Callable[[SearchConfig], tuple[bool, ...]] | None = None

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise HeadError(f"The 'input' of family {self.name!r} must be one of "
                            f"{', '.join(INPUT_KINDS)}. Got {self.input!r} instead.")
        if self.input == IMAGES and self.image_size is None:
            raise HeadError(f"Family {self.name!r} takes images: give its spec an image_size.")
        if self.input == ACTIVATIONS and self.activations is None:
            raise HeadError(f"Family {self.name!r} takes activations: give its spec an "
                            "activations function (which backbone's maps).")
        keys = [s.key for s in self.settings]
        if len(set(keys)) != len(keys):
            raise HeadError(f"Family {self.name!r} declares a setting twice: {keys}.")

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The search-config keys this family owns."""
        return tuple(s.key for s in self.settings)

    def check_settings(self, values: Mapping[str, Any]) -> None:
        """Validate this family's settings in a search config's ``family_settings``."""
        for setting in self.settings:
            if setting.key in values:
                setting.check(values[setting.key])

    @property
    def prefix(self) -> str:
        return f"{self.name}_"

    def params_of(self, config: dict[str, Any]) -> dict[str, Any]:
        """A trial config's searched parameters, still prefixed (as trials.csv shows them)."""
        return {k: v for k, v in config.items() if k.startswith(self.prefix)}

    def head_params(self, config: dict[str, Any], cfg: SearchConfig,
                    has_gpu: bool = False) -> dict[str, Any]:
        """A trial's config -> the head's constructor arguments (fixed ones and device added)."""
        params = {k[len(self.prefix):]: v for k, v in self.params_of(config).items()}
        params.update(self.fixed_params(cfg, params))
        params.update(self.device_params(has_gpu))
        return params

    def features_of(self, config: dict[str, Any]) -> str:
        """What a trial fitted on: its feature spec (an activation-map backbone for an
        ``activations`` family), or ``images``."""
        return IMAGES if self.input == IMAGES else str(config.get("features", ""))

    def input_key(self, cfg: SearchConfig) -> list[str]:
        """The inputs this family's trials may fit on: the feature specs, ``images``, or its
        activation-map backbone."""
        if self.input == IMAGES:
            return [IMAGES]
        if self.input == ACTIVATIONS:
            options = self.metadata(cfg) if self.metadata is not None else (False,)
            return [self._map_input(cfg, meta) for meta in options]
        return list(cfg.features)

    def activation_input(self, cfg: SearchConfig, params: Mapping[str, Any]) -> str:
        """An ``activations`` family's input for one trial, from its (prefixed) parameters: the
        map backbone, ``+meta`` where its ``<name>_meta`` parameter is true (not searched: the
        one option ``metadata(cfg)`` gives)."""
        options = self.metadata(cfg) if self.metadata is not None else (False,)
        return self._map_input(cfg, bool(params.get(f"{self.prefix}meta", options[0])))

    def _map_input(self, cfg: SearchConfig, meta: bool) -> str:
        assert self.activations is not None
        return self.activations(cfg) + ("+meta" if meta else "")


FAMILY_SPECS: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace) a family; returns the spec, so a module can keep it. A setting key that
    another family already declares is refused: the search config's keys are flat."""
    for other in FAMILY_SPECS.values():
        taken = set(spec.config_keys) & set(other.config_keys)
        if other.name != spec.name and taken:
            raise HeadError(f"Family {spec.name!r} declares setting(s) {', '.join(sorted(taken))}"
                            f", already declared by family {other.name!r}.")
    FAMILY_SPECS[spec.name] = spec
    return spec


def unregister_family(name: str) -> None:
    FAMILY_SPECS.pop(name, None)


def families() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(FAMILY_SPECS)


def get_family(name: str) -> FamilySpec:
    return lookup(FAMILY_SPECS, name, "head family", "families", HeadError)


def param_prefixes() -> tuple[str, ...]:
    """Every registered family's parameter prefix (``logistic_``, ...)."""
    return tuple(spec.prefix for spec in FAMILY_SPECS.values())


def family_settings() -> dict[str, Setting]:
    """Every registered family's settings: key -> its declaration, in registration order."""
    return {s.key: s for spec in FAMILY_SPECS.values() for s in spec.settings}
