"""The command line: exit codes and messages a user sees, `python -m dermray`."""

import subprocess
import sys

import pandas as pd

from dermray.cli import main


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
                           str(bad), "--images", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "field 'dx' outside the 7 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_synth_command(tmp_path, capsys):
    assert main(["data", "synth", "--dest", str(tmp_path), "--n", "35", "--size", "32x24"]) == 0
    frame = pd.read_csv(tmp_path / "HAM10000_metadata.csv")
    assert len(frame) == 35 and frame["dx"].nunique() == 7
    assert len(list(tmp_path.glob("HAM10000_images_part_*/*.jpg"))) == 35
