"""The head-family registry: every built-in family's spec is whole and consistent, an unknown
name lists the known ones, and the search stage's space comes from the specs alone."""

import optuna
import pytest

from dermray.config import build_section
from dermray.models.heads import FAMILIES, HeadError, families, get_family
from dermray.models.heads.registry import IMAGES, INPUT_KINDS, FamilySpec


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(HeadError, match="Unknown head family 'svm'. Known families: logistic, "
                                        "xgboost, mlp, finetune, cached_cnn."):
        get_family("svm")
    assert families()[:5] == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_space_first_point_and_head_params_agree(family):
    from dermray.stages.search import define_space, first_points

    spec = get_family(family)
    assert spec.input in INPUT_KINDS and spec.head_class.family == family
    cfg = build_section("search", {"families": [family], "finetune_weights": {"resnet50": "none"}})
    trial = optuna.create_study().ask()
    constants = define_space(trial, cfg) or {}  # an activations family's map is a constant
    (point,) = first_points(cfg)
    assert set(trial.params) | set(constants) == set(point), \
        "the first point sets exactly the searched keys"
    assert ("features" in point) == (spec.input != IMAGES)
    params = spec.head_params(point, cfg)
    head = spec.head_class(**params)  # every key is a constructor argument
    head._check_params()  # the first point and the fixed parameters are valid
    for setting in spec.settings:  # the family's own keys: on the config, their defaults valid
        assert setting.read(cfg) == cfg.family_settings[setting.key]
        setting.check(setting.default)


def test_resources_and_device_are_the_specs():
    cfg = build_section("search", {"cpus_per_trial": 2})
    assert get_family("logistic").resources(cfg, True) == {"CPU": 2.0, "GPU": 0}
    assert get_family("finetune").resources(cfg, False) == {"CPU": 2.0, "GPU": 0.0}
    assert get_family("finetune").resources(cfg, True)["GPU"] == 1.0
    xgb = get_family("xgboost")
    assert xgb.head_params({"family": "xgboost"}, cfg, has_gpu=True)["device"] == "cuda"
    assert xgb.head_params({"family": "xgboost"}, cfg, has_gpu=False)["device"] == "cpu"


def test_bad_family_keys_are_checked_by_their_spec():
    from dermray.errors import ConfigError

    with pytest.raises(ConfigError, match="search.mlp_max_epochs must be >= 1. Got 0 instead."):
        build_section("search", {"mlp_max_epochs": 0})
    with pytest.raises(ConfigError, match="search.cached_cnn_features must be one of"):
        build_section("search", {"cached_cnn_features": "resnet50"})
    with pytest.raises(ConfigError, match="search.finetune_backbones must be a non-empty list of "
                                          "resnet50, vgg19 without repeats"):
        build_section("search", {"finetune_backbones": ["vgg19", "vgg19"]})
    with pytest.raises(ConfigError, match="search.cached_cnn_tta must be true or false"):
        build_section("search", {"cached_cnn_tta": "sometimes"})
    with pytest.raises(HeadError, match="input"):
        FamilySpec("bad", object, space=lambda t, c: None, first_point=lambda c: {},
                   input="pixels")
    with pytest.raises(HeadError, match="takes activations: give its spec an activations"):
        FamilySpec("bad", object, space=lambda t, c: None, first_point=lambda c: {},
                   input="activations")


def test_every_shipped_config_loads_in_a_fresh_process():
    """No section depends on which stage modules were imported (dermray.stages.search is not)."""
    import subprocess
    import sys
    from pathlib import Path

    configs = sorted(str(p) for p in Path(__file__).parents[2].glob("ray_jobs/configs/*.yaml"))
    code = ("import sys\nfrom dermray.config import SECTIONS, load_section, read_yaml\n"
            "for path in sys.argv[1:]:\n"
            "    for name in read_yaml(path):\n"
            "        load_section(name, path)\n"
            "assert 'dermray.stages.search' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, *configs], check=True)
