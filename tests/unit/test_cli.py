"""The command line: exit codes and messages a user sees, `python -m dermray`."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dermray.cli import build_parser, main, preflight


def test_validate_and_split(synth_dir, tmp_path, capsys):
    meta = str(synth_dir / "HAM10000_metadata.csv")
    assert main(["data", "validate", "--metadata", meta, "--images", str(synth_dir)]) == 0
    out = capsys.readouterr().out
    assert "rows: 140" in out and "catalog is valid" in out
    assert main(["data", "split", "--metadata", meta, "--out", str(tmp_path), "--seed", "3"]) == 0
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert len(manifest) == 140 and set(manifest["split"]) == {"train", "val", "test"}


def test_invalid_catalog_exits_nonzero_without_traceback(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("lesion_id,image_id,dx,age,sex,localization\nHAM_1,ISIC_0000001,cancer,1,m,x\n")
    proc = subprocess.run([sys.executable, "-m", "dermray", "data", "validate", "--metadata",
                           str(bad), "--images", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert "field 'dx' outside the 7 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_synth_command(tmp_path, capsys):
    assert main(["data", "synth", "--dest", str(tmp_path), "--n", "35", "--size", "32x24"]) == 0
    frame = pd.read_csv(tmp_path / "HAM10000_metadata.csv")
    assert len(frame) == 35 and frame["dx"].nunique() == 7
    assert len(list(tmp_path.glob("HAM10000_images_part_*/*.jpg"))) == 35


REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("ray_jobs/configs/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_passes_every_commands_checks(config, monkeypatch, tmp_path):
    """What `dermray <command> --config` and ray_jobs/*.py (the same parser) check before a stage
    runs: every section, and the weights files of the commands that build models."""
    monkeypatch.chdir(REPO)  # the configs' relative paths (../shared/weights) are from here
    if "../shared/" in config.read_text() and not (REPO.parent / "shared").exists():
        pytest.skip("this config names files in ../shared, not present here")
    out, c = str(tmp_path / "out"), str(config)
    for argv in (["data", "validate", "--config", c], ["data", "split", "--config", c, "--out", out],
                 ["extract", "--config", c, "--manifest", "m.parquet", "--out", out],
                 ["search", "--config", c, "--out", out], ["run", "--config", c, "--out", out]):
        configs = preflight(build_parser().parse_args(argv))
        assert "data" in configs or argv[0] != "run"


@pytest.mark.parametrize("change, fragment", [
    (("num_samples: 8", "num_samples: 0"), "search.num_samples must be >= 1"),
    (("families: [logistic, xgboost, mlp, finetune]", "families: []"), "search.families"),
    (("backbones: [resnet50, vgg19]", "backbones: [resnet50, resnet50]"), "without repeats"),
    (("{resnet50: none, vgg19: none}", "{resnet50: w.h5, vgg19: none}"), "not an HDF5 file"),
])
def test_a_bad_later_section_is_refused_before_any_stage(tmp_path, capsys, change, fragment):
    (tmp_path / "w.h5").write_text("not weights")
    text = (REPO / "ray_jobs/configs/demo.yaml").read_text()
    assert change[0] in text
    config = tmp_path / "c.yaml"
    config.write_text(text.replace(change[0], change[1].replace("w.h5", str(tmp_path / "w.h5"))))
    out = tmp_path / "out"
    for argv in (["run", "--config", str(config), "--out", str(out)],
                 ["extract", "--config", str(config), "--manifest", "m", "--out", str(out)]):
        assert main(argv) == 2
        assert fragment in capsys.readouterr().err
    assert not out.exists()  # nothing ran: no lock, no synthetic data, no Ray


@pytest.mark.parametrize("flags, fragment", [
    (["--size", "0x0"], "--size must be WIDTHxHEIGHT"),
    (["--size", "abc"], "Got 'abc' instead"),
    (["--size", "64x99999"], "each side in [8, 2048]"),
    (["--n", "0"], "--n, data.synth_n) must be in [28, 1000000]"),
    (["--n", "27"], "Got 27 instead"),
])
def test_synth_with_bad_sizes_is_a_message(tmp_path, capsys, flags, fragment):
    assert main(["data", "synth", "--dest", str(tmp_path / "d"), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_synth_smallest_n_still_splits(tmp_path):
    assert main(["data", "synth", "--dest", str(tmp_path), "--n", "28", "--size", "16x12"]) == 0
    assert main(["data", "split", "--metadata", str(tmp_path / "HAM10000_metadata.csv"),
                 "--out", str(tmp_path / "out")]) == 0


def _every_parser(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _every_parser(sub)


def test_every_option_has_help_and_one_meaning_of_verbose(capsys):
    parser = build_parser()
    parsers = list(_every_parser(parser))
    assert len(parsers) >= 12  # dermray, data and its four, and the six other commands
    bare = [(p.prog, a.option_strings or a.dest) for p in parsers for a in p._actions
            if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert bare == []
    for argv in (["-v", "report", "o"], ["report", "o", "-v"], ["report", "--verbose", "o"],
                 ["run", "--config", "c", "--out", "o", "--verbose"], ["-v", "run", "--config",
                                                                        "c", "--out", "o"]):
        assert parser.parse_args(argv).verbose is True, argv
    assert not getattr(parser.parse_args(["report", "o"]), "verbose", False)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0
    assert re.match(r"dermray \S+ \(Ray \S+, Python 3\.\d+\.\d+\)", capsys.readouterr().out)
