import pytest

from dermray.config import (
    DataConfig,
    ExtractConfig,
    build_section,
    check_weights_files,
    config_to_dict,
    load_all,
    load_section,
)
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
    ({"backbones": ["vgg16"]}, "extract.backbones must be one of ['resnet50', "),
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


@pytest.mark.parametrize("section, values, fragment", [
    ("extract", {"backbones": ["resnet50", "resnet50"]},
     "extract.backbones must be a list without repeats (resnet50 given more than once)"),
    ("search", {"families": ["logistic", "logistic"]}, "search.families must be a list without"),
    ("search", {"features": ["resnet50+resnet50"]}, "each at most once. Got 'resnet50+resnet50'"),
    ("search", {"num_samples": 0}, "search.num_samples must be >= 1. Got 0"),
    ("search", {"families": []}, "search.families must be a non-empty list"),
])
def test_repeats_and_empty_lists_are_refused(section, values, fragment):
    with pytest.raises(ConfigError) as err:
        build_section(section, values)
    assert fragment in str(err.value)


def test_load_all_validates_every_section_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  synth_n: 40\nextract:\n  backbones: [vgg19, vgg19]\n"
                    "search:\n  num_samples: 0\n")
    with pytest.raises(ConfigError) as err:
        load_all(path, {"data": {"out": "o"}})
    assert "2 problems" in str(err.value)
    assert "extract.backbones" in str(err.value) and "search.num_samples" in str(err.value)
    path.write_text("data:\n  synth_n: 40\n")
    built = load_all(path, {"extract": {"image_size": 64}})
    assert set(built) == {"data", "extract"} and built["extract"].image_size == 64


def _weights_files(tmp_path):
    import h5py

    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as f:
        f.attrs["layer_names"] = [b"conv1", b"conv5_block3_3_conv"]
        f.create_group("conv1")
    with h5py.File(tmp_path / "vgg.h5", "w") as f:  # another network's weights
        f.attrs["layer_names"] = [b"block1_conv1", b"block5_conv4"]
        f.create_group("block1_conv1")
    (tmp_path / "text.h5").write_text("these are not weights\n")
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "trunc.h5").write_bytes(good.read_bytes()[:600])
    with h5py.File(tmp_path / "hollow.h5", "w"):
        pass
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        z.writestr("config.json", "{}")
    (tmp_path / "folder.h5").mkdir()
    return good


@pytest.mark.parametrize("name, fragment", [
    ("text.h5", "is not an HDF5 file (22 bytes starting"),
    ("empty.h5", "is not an HDF5 file (empty)"),
    ("trunc.h5", "is not a readable HDF5 file (truncated or damaged"),
    ("hollow.h5", "holds no layer weights"),
    ("m.keras", "a zip without a *.weights.h5 inside"),
    ("folder.h5", "is a folder, not a file"),
    ("nope.h5", "does not exist"),
    ("vgg.h5", "does not fit resnet50: it holds no layer 'conv5_block3_3_conv'"),
])
def test_weights_files_are_checked_before_any_actor(tmp_path, name, fragment):
    good = _weights_files(tmp_path)
    check_weights_files({"extract": build_section("extract", {"weights": {"resnet50": str(good)}})})
    cfg = build_section("extract", {"weights": {"resnet50": str(tmp_path / name)}})
    with pytest.raises(ConfigError) as err:
        check_weights_files({"extract": cfg})
    message = str(err.value)
    assert fragment in message and "extract.weights.resnet50" in message and name in message
    assert "'imagenet'" in message  # the fix


def test_real_resnet50_weights_are_refused_for_vgg19(resnet50_weights):
    """The driver reads the file's layer names (milliseconds): no actor builds VGG19 with them."""
    cfg = build_section("extract", {"backbones": ["vgg19"],
                                    "weights": {"vgg19": str(resnet50_weights)}})
    with pytest.raises(ConfigError, match="does not fit vgg19: it holds no layer 'block5_conv4'"):
        check_weights_files({"extract": cfg})
    ok = build_section("extract", {"weights": {"resnet50": str(resnet50_weights)}})
    check_weights_files({"extract": ok})


def test_synth_n_needs_four_lesions_per_class():
    with pytest.raises(ConfigError, match="data.synth_n must be 0 .off. or at least 28"):
        build_section("data", {"synth_n": 5})
    assert build_section("data", {"synth_n": 28}).synth_n == 28


def test_family_keys_are_flat_search_keys(tmp_path):
    """A family's own keys stay flat YAML keys of ``search:``, typed and checked by its spec."""
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  mlp_max_epochs: '20'\n  finetune_weights: {resnet50: none}\n"
                    "  cached_cnn_tta: false\n")
    cfg = load_section("search", path)
    assert cfg.family_settings["mlp_max_epochs"] == 20
    assert cfg.family_settings["finetune_weights"] == {"resnet50": "none"}
    assert cfg.family_settings["cached_cnn_tta"] is False
    assert cfg.family_settings["xgb_max_estimators"] == 400  # the family's default
    flat = config_to_dict(cfg)
    assert flat["mlp_max_epochs"] == 20 and "family_settings" not in flat
    assert build_section("search", flat) == cfg  # the flat dict is a config again
    with pytest.raises(ConfigError, match="Unknown key.*: family_settings"):
        build_section("search", {"family_settings": {"mlp_max_epochs": 3}})


def test_unknown_keys_suggest_the_closest_known_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_section("search", {"mlp_max_epoch": 3, "zzz": 1})
    message = str(err.value)
    assert "mlp_max_epoch (did you mean mlp_max_epochs?), zzz." in message
    assert "Known keys: out, families," in message and "cached_cnn_gpus" in message
    path = tmp_path / "c.yaml"
    path.write_text("serach:\n  num_samples: 2\n")
    with pytest.raises(ConfigError, match=r"serach \(did you mean search\?\)"):
        load_section("search", path)


def test_a_family_weights_key_is_checked_like_a_field(tmp_path):
    (tmp_path / "text.h5").write_text("these are not weights\n")
    cfg = build_section("search", {"finetune_weights": {"resnet50": str(tmp_path / "text.h5")},
                                   "cached_cnn_weights": str(tmp_path / "nope.h5")})
    with pytest.raises(ConfigError) as err:
        check_weights_files({"search": cfg})
    message = str(err.value)
    assert "2 weights files" in message and "search.finetune_weights.resnet50" in message
    assert "search.cached_cnn_weights: weights file" in message
