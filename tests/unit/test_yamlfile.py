"""The bounded YAML loader reads every shipped config exactly as yaml.safe_load did, keeps
YAML's merge keys and aliases within the budget, and counts an expanded document exactly
(the refusals are in the bad-input corpus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dermray.errors import ConfigError
from dermray.io import yamlfile

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "ray_jobs" / "configs").glob("*.yaml")) + sorted(
    (REPO / "benchmarks").glob("**/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_exactly_as_before(path):
    assert yamlfile.load(path) == yaml.safe_load(path.read_text())


def test_aliases_and_merge_keys_within_the_budget(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &base {seed: 1, num_samples: 4}\n"
                    "search:\n  <<: *base\n  num_samples: 8\n  features: &f [resnet50, vgg19]\n"
                    "extract:\n  backbones: *f\n")
    assert yamlfile.load(path) == {
        "base": {"seed": 1, "num_samples": 4},
        "search": {"seed": 1, "num_samples": 8, "features": ["resnet50", "vgg19"]},
        "extract": {"backbones": ["resnet50", "vgg19"]}}


def test_the_expanded_size_is_counted_without_expanding(tmp_path):
    # [a x3] shared 3 times, that list shared 3 times: 1 + 3 * (1 + 3 * (1 + 3)) nodes
    text = "x: &a [1, 2, 3]\ny: &b [*a, *a, *a]\nz: [*b, *b, *b]\n"
    node = yaml.compose(text)
    z = node.value[2][1]
    assert yamlfile.expanded_size(z) == 1 + 3 * (1 + 3 * (1 + 3))
    with pytest.raises(ConfigError, match="more than 30 values"):
        yamlfile.expanded_size(z, budget=30)


def test_an_empty_file_is_none(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing\n")
    assert yamlfile.load(tmp_path / "e.yaml") is None
