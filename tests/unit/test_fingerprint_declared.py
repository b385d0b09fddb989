"""Whether a setting changes its stage's output is declared once, on the setting (issue 19): every
config field and every registered family's own setting says so, a field that does not is refused,
and each stage's fingerprint holds exactly its ``output`` settings."""

from __future__ import annotations

import dataclasses

import pytest

from dermray.config import (
    SECTIONS,
    ExtractConfig,
    build_section,
    config_to_dict,
    effects,
    output_settings,
    setting,
    yaml_keys,
)
from dermray.io.fingerprint import EFFECTS, OUTPUT
from dermray.models.heads import FAMILY_SPECS, HeadError
from dermray.models.heads.registry import Setting


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_config_key_declares_its_effect(section):
    """Fails for a field added without ``setting(default, effect)`` (and for a family setting
    with a bad effect): what reuses old work is never left to a list someone must extend."""
    declared = effects(SECTIONS[section])
    assert list(declared) == yaml_keys(SECTIONS[section])  # every YAML key, a family's too
    assert set(declared.values()) <= set(EFFECTS)


def test_every_family_setting_declares_its_effect():
    for spec in FAMILY_SPECS.values():
        for s in spec.settings:
            assert s.effect in EFFECTS, f"{spec.name}: {s.key}"
    assert "mlp_max_epochs" in effects(SECTIONS["search"])


def test_an_undeclared_field_or_effect_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Plain:
        seed: int = setting(0, OUTPUT)
        tile: int = 3  # no declaration

    with pytest.raises(TypeError, match="Plain.tile does not declare what it does"):
        effects(Plain)
    with pytest.raises(TypeError, match="must be one of output, input, neutral"):
        setting(0, "sometimes")
    with pytest.raises(HeadError, match="'effect' of setting 'toy_n' must be one of"):
        Setting("toy_n", 1, int, "sometimes")


def test_a_stage_fingerprints_its_output_settings_only():
    base = output_settings(ExtractConfig())
    assert output_settings(ExtractConfig(batch_size=8, num_actors=3, jit_compile=False)) == base
    assert output_settings(ExtractConfig(tta_views=2)) != base
    # backbones and weights are fingerprinted per folder, by name and sha256: not settings
    assert "weights" not in base and "backbones" not in base and "image_size" in base
    search = output_settings(build_section("search", {"mlp_max_epochs": 7, "out": "o",
                                                      "cpus_per_trial": 3}))
    assert search["mlp_max_epochs"] == 7 and search["finetune_weights"] == {}
    assert "out" not in search and "cpus_per_trial" not in search
    assert set(search) <= set(config_to_dict(build_section("search", {})))
