"""A rerun into an existing OUT never mixes two results: every changed setting is refused with
what changed (or, with --fresh, that stage starts over), the same settings resume, and one
writer holds OUT at a time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dermray.cli import main
from dermray.embeddings import read_frame
from dermray.fingerprint import StaleOutputError
from dermray.pipeline import run_pipeline

BASE = {
    "data": {"seed": 0},
    "extract": {"backbones": ["resnet50"], "weights": {"resnet50": "none"}, "image_size": 32,
                "batch_size": 16, "augment": False, "jit_compile": False},
    "search": {"families": ["logistic"], "features": ["resnet50"], "num_samples": 1},
}


def config(tmp_path: Path, synth_dir: Path, name: str, **changes) -> str:
    sections = json.loads(json.dumps(BASE))
    sections["data"]["metadata"] = str(synth_dir / "HAM10000_metadata.csv")
    for key, value in changes.items():
        section, field = key.split("__")
        sections[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


@pytest.fixture(scope="module")
def first_run(ray_local, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reruns")
    out = tmp / "out"
    result = run_pipeline(config(tmp, synth_dir, "base"), str(out))
    return tmp, out, result


def test_same_settings_resume(first_run, synth_dir):
    tmp, out, first = first_run
    again = run_pipeline(config(tmp, synth_dir, "base"), str(out))
    record = json.loads((out / "extract_run.json").read_text())
    assert record["views_pending_at_start"] == 0
    assert again["winner"] == first["winner"]


@pytest.mark.parametrize("change, what", [
    ({"extract__image_size": 48}, "settings.image_size: 32 -> 48"),
    ({"extract__tta_views": 1}, "settings.tta_views: 0 -> 1"),
    ({"extract__weights": {"resnet50": "none"}, "extract__seed": 3}, "settings.seed: 0 -> 3"),
    ({"data__seed": 1}, "settings.seed: 0 -> 1"),
    ({"extract__augment": True}, "settings.augment: False -> True"),
    ({"search__families": ["logistic", "mlp"]}, "settings.families"),
    ({"search__num_samples": 2}, "settings.num_samples: 1 -> 2"),
])
def test_a_changed_setting_is_refused_and_nothing_is_mixed(first_run, synth_dir, change, what):
    tmp, out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    with pytest.raises(StaleOutputError, match=f"{what}.*new --out.*--fresh"):
        run_pipeline(config(tmp, synth_dir, "changed", **change), str(out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")
            if not p.name.startswith("quarantine")} == {
        p: t for p, t in before.items() if not p.name.startswith("quarantine")}


def test_other_weights_are_refused(first_run, synth_dir, resnet50_weights):
    """The same backbone with other weights (the real ImageNet file instead of seeded random
    ones): refused by the weights' identity, before any actor starts."""
    tmp, out, _ = first_run
    changed = config(tmp, synth_dir, "weights", extract__weights={"resnet50": str(resnet50_weights)})
    with pytest.raises(StaleOutputError, match="backbone=resnet50.*inputs.weights.*new --out.*--fresh"):
        run_pipeline(changed, str(out))


def test_fresh_redoes_the_stage_with_the_new_settings(first_run, synth_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[1], out)  # a finished run of the base settings
    result = run_pipeline(config(tmp_path, synth_dir, "seed1", data__seed=1,
                                 extract__image_size=48), str(out), fresh=True)
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("image_id")
    frame = read_frame(out, "resnet50")
    # every embedding row carries the split of the manifest it was made from
    assert (frame.set_index("image_id")["split"] == manifest.loc[frame["image_id"], "split"]).all()
    record = json.loads((out / "extract_run.json").read_text())
    assert record["config"]["image_size"] == 48 and record["views_pending_at_start"] == 140
    bundle = json.loads((out / "model" / "bundle.json").read_text())
    assert bundle["image_size"] == 48 and result["winner"]["family"] == "logistic"


def test_a_second_writer_is_refused_naming_the_holder(first_run, synth_dir, capsys):
    tmp, out, _ = first_run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / ".dermray.lock"
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                    "command": "dermray run", "started": "2026-11-29T08:00:00"}))
        code = main(["run", "--config", config(tmp, synth_dir, "base"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {sleeper.pid}" in err and "2026-11-29T08:00:00" in err
        assert "Traceback" not in err
    finally:
        sleeper.kill()
        sleeper.wait()
    # its holder is gone now: the lock is stale and the next run takes it over
    assert main(["run", "--config", config(tmp, synth_dir, "base"), "--out", str(out)]) == 0
    assert not lock.exists()
    assert os.environ.get("RAY_ADDRESS") is None
