import pytest

from dermray.config import DataConfig, ExtractConfig, build_section, load_section
from dermray.errors import ConfigError


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  metadata: m.csv\n  seed: 3\nextract:\n  image_size: 64\n")
    cfg = load_section("data", path, {"seed": 7, "out": None})
    assert cfg == DataConfig(metadata="m.csv", seed=7)
    ext = load_section("extract", path, {"batch_size": "8"})
    assert (ext.image_size, ext.batch_size) == (64, 8)


@pytest.mark.parametrize("values, fragment", [
    ({"metadata": "m", "sed": 1}, "Unknown key(s) in section 'data': sed"),
    ({"metadata": "m", "seed": "x"}, "data.seed must be an integer. Got 'x'"),
    ({"metadata": "m", "train_frac": 0.8}, "must be 1.0"),
    ({"metadata": "m", "val_frac": 1.5}, "data.val_frac must be a fraction"),
    ({}, "data.metadata must be a metadata CSV path"),
])
def test_bad_data_values_name_key_and_value(values, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        build_section("data", values)
    assert fragment in str(err.value)


@pytest.mark.parametrize("values, fragment", [
    ({"backbones": ["vgg16"]}, "extract.backbones must be one of ['resnet50', 'resnet50_ms', 'vgg19']"),
    ({"image_size": 8}, "extract.image_size must be an integer in [32, 1024]. Got 8"),
    ({"augment": "maybe"}, "extract.augment must be true or false. Got 'maybe'"),
    ({"weights": {"alexnet": "none"}}, "extract.weights must be keyed by one of"),
    ({"tta_views": 9}, "extract.tta_views must be at most 7"),
])
def test_bad_extract_values(values, fragment):
    with pytest.raises(ConfigError) as err:
        build_section("extract", values)
    assert fragment in str(err.value)


def test_unknown_section_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dta:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="Unknown section"):
        load_section("data", path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_section("data", tmp_path / "nope.yaml")


def test_extract_defaults_are_valid():
    cfg = ExtractConfig()
    assert cfg.backbones == ("resnet50", "vgg19")
    assert cfg.weights_for("vgg19") == "imagenet"
