"""The exported bundle is checked on load against what it claims: an edited or damaged
bundle.json is a clear error naming the field (exit 2 from `dermray predict`), never a relabelled
prediction or a traceback. (Every field and number: tests/unit/test_bundle_spec.py.)"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from dermray.cli import main
from dermray.errors import DermrayError
from dermray.models.bundle import BackboneRecord, BundleError, BundleSpec, load_bundle


def damaged(model, tmp_path, edit):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    spec = json.loads((copy / "bundle.json").read_text())
    edit(spec)
    (copy / "bundle.json").write_text(json.dumps(spec))
    return copy


def set_key(key, value):
    return lambda spec: spec.__setitem__(key, value)


def drop_key(key):
    return lambda spec: spec.pop(key)


def reorder_labels(spec):
    spec["labels"] = spec["labels"][::-1]


def unknown_backbone(spec):
    if spec["backbones"]:
        spec["backbones"][0]["name"] = "alexnet"
    else:
        spec["family"] = "svm"


CASES = [
    (reorder_labels, "'labels' must be"),
    (set_key("image_size", 0), "'image_size' must be an integer in \\[32, 1024\\]"),
    (set_key("image_size", "224"), "'image_size' must be an integer in \\[32, 1024\\]"),
    (set_key("tta_views", 100_000), "'tta_views' must be an integer in \\[0, 7\\]"),
    (drop_key("family"), "'family' must be present"),
    (drop_key("backbones"), "'backbones' must be present"),
    (unknown_backbone, "alexnet|svm"),
    (set_key("trial_id", "another"), "changed after export: its checksum"),
]


@pytest.mark.parametrize("edit, message", CASES)
def test_damaged_bundle_is_a_clear_error(searched, tmp_path, capsys, edit, message):
    out, _ = searched
    model = damaged(out / "model", tmp_path, edit)
    with pytest.raises(DermrayError, match=message) as info:
        load_bundle(model)
    assert "bundle.json" in str(info.value) or "Known" in str(info.value)
    # the bundle is refused before any image is read
    code = main(["predict", "--model", str(model), str(tmp_path / "any.jpg")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("error:")


def test_a_feature_size_the_head_does_not_take_is_refused(searched, tmp_path):
    out, _ = searched
    spec = json.loads((out / "model" / "bundle.json").read_text())
    if not spec["backbones"]:
        pytest.skip("the winner takes images")
    # bundle.json rewritten whole (checksum included), as if export had recorded other features
    copy = tmp_path / "model"
    shutil.copytree(out / "model", copy)
    exported, files = BundleSpec.from_json((copy / "bundle.json").read_text(), "bundle.json")
    other = "vgg19" if "resnet50" in exported.features else "resnet50"
    (copy / "bundle.json").write_text(replace(
        exported, features=other, backbones=(BackboneRecord.of(other, "none"),)).to_json(files))
    with pytest.raises(BundleError, match="the head takes .* inputs, but bundle.json"):
        load_bundle(copy)


def test_not_json_is_a_clear_error(searched, tmp_path):
    out, _ = searched
    copy = tmp_path / "model"
    shutil.copytree(out / "model", copy)
    (copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
