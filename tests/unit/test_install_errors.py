"""A missing TensorFlow, xgboost or MLflow is found in the driver before Ray starts, and the
message gives the install command (find_spec is monkeypatched: nothing is uninstalled)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from dermray import installed
from dermray.cli import main

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def without(monkeypatch):
    """``without("tensorflow", ...)``: find_spec says those modules are not installed, and
    starting Ray fails the test."""

    def hide(*modules: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name in modules else REAL_FIND_SPEC(name, *a))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the missing package was reported")

    for stage in ("extract", "search", "predict"):  # each stage's own name for it
        monkeypatch.setattr(f"dermray.stages.{stage}.ensure_ray", no_ray)
    return hide


def test_extract_without_tensorflow_says_install_the_cpu_extra(without, tmp_path, capsys):
    without("tensorflow")
    code = main(["extract", "--manifest", str(tmp_path / "manifest.parquet"),
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "tensorflow is not installed" in err and "pip install 'dermray[cpu]'" in err
    assert "dermray[gpu]" in err


def test_search_names_each_missing_package_of_its_families(without, tmp_path, capsys):
    without("tensorflow", "xgboost", "mlflow")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"search": {
        "families": ["logistic", "xgboost", "mlp"],
        "mlflow_tracking_uri": "file:///tmp/mlruns"}}))
    code = main(["search", "--out", str(tmp_path), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    for module, command in (("xgboost", "pip install 'dermray'"),
                            ("tensorflow", "pip install 'dermray[cpu]'"),
                            ("mlflow", "pip install 'dermray[track]'")):
        assert f"{module} is not installed" in err and command in err
    assert "'mlp'" in err  # why: the family that needs TensorFlow


def test_run_checks_every_stage_of_its_config(without, tmp_path, capsys):
    without("tensorflow")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"synth_n": 40}, "extract": {},
                                      "search": {"families": ["logistic"]}}))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'dermray[cpu]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_nothing_missing_passes(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    installed.require_all(installed.extract_needs())
    installed.require("mlflow", "tracking is on")


def test_a_broken_install_counts_as_missing(monkeypatch):
    def broken(name, *a):
        raise ValueError(f"{name}.__spec__ is None")

    monkeypatch.setattr(importlib.util, "find_spec", broken)
    with pytest.raises(installed.MissingPackageError, match=r"pip install 'dermray\[track\]'"):
        installed.require("tensorboard", "you asked for TensorBoard")


def test_a_family_s_packages_come_from_its_spec(without, tmp_path, capsys):
    """cached_cnn is a Keras head: the second table it was missing from is gone."""
    from dermray.config import build_section
    from dermray.models.heads import FAMILY_SPECS

    cfg = build_section("search", {"families": list(FAMILY_SPECS)})
    assert {m for m, _ in installed.search_needs(cfg)} == {"tensorflow", "xgboost"}
    assert ("tensorflow", "search.families has 'cached_cnn'") in installed.search_needs(cfg)
    assert installed.search_needs(build_section("search", {"families": ["logistic"]})) == []
    without("tensorflow")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"search": {"families": ["cached_cnn"]}}))
    assert main(["search", "--out", str(tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tensorflow is not installed" in err and "'cached_cnn'" in err
