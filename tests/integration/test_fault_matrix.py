"""The fault matrix (issue 10), on one reference run that nothing interrupted:

- every changed setting (image_size, TTA views, seeds, augmentation, weights, families,
  num_samples) is refused naming what changed, and nothing is mixed; --fresh redoes the stage;
- a run killed with SIGKILL in each stage, then rerun, ends with exactly the rows, the winner and
  the model of the reference; a second writer beside a live one is refused and corrupts nothing.

The kill -9s of runs that start Ray (extract, search, the model swap: about 2.5 minutes on 2
cores) are marked slow, to keep `make test` within its 10 minutes; run them with
`.venv/bin/python -m pytest -m slow tests/integration/test_fault_matrix.py`. The split's kill,
the changed settings and the second writer run in `make test`.

The crashes are real kill -9s of a real `python -m dermray run` (its own local Ray), placed by
dermray.io.faults at the worst moment of each stage: a file written under its temporary name and
not yet renamed (split), the first batch of embeddings written (extract), the first Tune trial
finished (search), the new model built and not yet swapped in (export). The reruns run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dermray.cli import main
from dermray.config import load_section
from dermray.io import faults
from dermray.io.fingerprint import StaleOutputError
from dermray.io.lock import hold
from dermray.models.bundle import load_bundle
from dermray.models.embeddings import read_frame
from dermray.models.predict_io import predict_files
from dermray.stages.pipeline import run_pipeline, run_split

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "data": {"seed": 0},
    "extract": {"backbones": ["resnet50"], "weights": {"resnet50": "none"}, "image_size": 32,
                "batch_size": 16, "augment": False, "jit_compile": False},
    # two trials, one after the other, in a sequence that does not depend on timing
    "search": {"families": ["logistic"], "features": ["resnet50"], "num_samples": 2,
               "max_concurrent": 1, "seed_each_family": False, "deterministic": True},
}


def config(tmp_path: Path, synth_dir: Path, name: str, **changes) -> str:
    """The reference settings, with ``section__field=value`` changes, as a YAML file."""
    sections = json.loads(json.dumps(SETTINGS))
    sections["data"]["metadata"] = str(synth_dir / "HAM10000_metadata.csv")
    for key, value in changes.items():
        section, field = key.split("__")
        sections[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


@pytest.fixture(scope="module")
def reference(ray_local, synth_dir, tmp_path_factory):
    """The config, and the outputs of one run of it that nothing interrupted."""
    tmp = tmp_path_factory.mktemp("faults")
    path = config(tmp, synth_dir, "base")
    out = tmp / "reference"
    result = run_pipeline(path, str(out))
    return path, out, outputs(out, result)


def outputs(out: Path, result: dict) -> dict:
    """What a finished run must reproduce: the split, every embedding row, the winner and the
    model's probabilities for a few images."""
    manifest = pd.read_parquet(out / "manifest.parquet").sort_values("image_id")
    frame = read_frame(out, "resnet50").sort_values(["image_id", "aug_index"])
    bundle = load_bundle(out / "model")
    paths = manifest["path"].head(4).tolist()
    return {
        "manifest": manifest.reset_index(drop=True),
        "keys": frame[["image_id", "aug_index", "split", "label"]].reset_index(drop=True),
        "embeddings": np.stack(frame["embedding"].to_numpy()),
        "winner": result["winner"],
        "trials": pd.read_csv(out / "trials.csv")[["family", "params", "val_accuracy"]]
        .sort_values(["params"]).reset_index(drop=True),
        "proba": proba(bundle, paths),
    }


def proba(bundle, paths: list[str]) -> np.ndarray:
    frame, problems = predict_files(bundle, paths)
    assert not problems and len(frame) == len(paths)
    return frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()


def test_same_settings_resume(reference):
    path, out, ref = reference
    again = run_pipeline(path, str(out))
    record = json.loads((out / "extract_run.json").read_text())
    assert record["views_pending_at_start"] == 0
    assert again["winner"] == ref["winner"]


@pytest.mark.parametrize("change, what", [
    ({"extract__image_size": 48}, "settings.image_size: 32 -> 48"),
    ({"extract__tta_views": 1}, "settings.tta_views: 0 -> 1"),
    ({"extract__weights": {"resnet50": "none"}, "extract__seed": 3}, "settings.seed: 0 -> 3"),
    ({"data__seed": 1}, "settings.seed: 0 -> 1"),
    ({"extract__augment": True}, "settings.augment: False -> True"),
    ({"search__families": ["logistic", "mlp"]}, "settings.families"),
    ({"search__num_samples": 3}, "settings.num_samples: 2 -> 3"),
])
def test_a_changed_setting_is_refused_and_nothing_is_mixed(reference, synth_dir, tmp_path,
                                                           change, what):
    _, out, _ = reference
    tmp = tmp_path
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    with pytest.raises(StaleOutputError, match=f"{what}.*new --out.*--fresh"):
        run_pipeline(config(tmp, synth_dir, "changed", **change), str(out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")
            if not p.name.startswith("quarantine")} == {
        p: t for p, t in before.items() if not p.name.startswith("quarantine")}


def test_other_weights_are_refused(reference, synth_dir, tmp_path, resnet50_weights):
    """The same backbone with other weights (the real ImageNet file instead of seeded random
    ones): refused by the weights' identity, before any actor starts."""
    _, out, _ = reference
    changed = config(tmp_path, synth_dir, "weights",
                     extract__weights={"resnet50": str(resnet50_weights)})
    with pytest.raises(StaleOutputError, match="backbone=resnet50.*inputs.weights.*new --out.*--fresh"):
        run_pipeline(changed, str(out))


@pytest.mark.slow  # a whole pipeline again (23 s); test_confinement covers what --fresh deletes: run with -m slow
def test_fresh_redoes_the_stage_with_the_new_settings(reference, synth_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[1], out, symlinks=True)  # a finished run of the base settings
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


HOLDER = """
import sys, time
from dermray.io.lock import hold
with hold(sys.argv[1], "dermray run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(reference, capsys):
    path, out, _ = reference
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lock = out / ".dermray.lock"
    try:
        assert holder.stdout.readline().strip() == "held"
        started = json.loads(lock.read_text())["started"]
        code = main(["run", "--config", path, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid} on {socket.gethostname()}" in err
        assert started in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone (killed: the kernel let its lock go): the next run takes it over
    assert lock.exists()
    assert main(["run", "--config", path, "--out", str(out)]) == 0
    assert not lock.exists()
    assert os.environ.get("RAY_ADDRESS") is None


def rerun(config: str, out: Path) -> dict:
    """The rerun, as `dermray run` makes it: under OUT's lock (taking over the dead run's)."""
    with hold(str(out), "dermray run"):
        return run_pipeline(config, str(out))


def killed_run(config: str, out: Path, point: str, pause: bool = False) -> subprocess.Popen:
    """`python -m dermray run` that kills itself at ``point`` (or pauses there); its output
    goes to OUT.log (a pipe nobody reads would block it)."""
    # this session's own settings (its Ray, its armed actor crash point) stay here
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *faults.VARIABLES)}
    env.update({"DERMRAY_FAULT": point, "DERMRAY_FAULT_READY": str(out) + ".ready",
                "PYTHONPATH": str(REPO)})
    if pause:
        env["DERMRAY_FAULT_ACTION"] = "pause"
    with open(str(out) + ".log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "dermray", "run", "--config", config,
                                 "--out", str(out)], env=env, cwd=REPO, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)


def reap(proc: subprocess.Popen, out: Path) -> str:
    """Kill -9 what is left of the run (its local Ray: every process of its session) and wait
    until none is left, so that no dying actor writes beside the rerun; return its output."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        table = subprocess.run(["ps", "-eo", "sid=,stat="], capture_output=True, check=False,
                               text=True).stdout
        alive = [line for line in table.splitlines()  # zombies are dead: they write nothing
                 if line.split()[:1] == [str(proc.pid)] and not line.split()[1].startswith("Z")]
        if not alive:
            break
        time.sleep(0.5)
    proc.wait(timeout=60)
    return Path(str(out) + ".log").read_text(errors="replace")


def assert_same(out: Path, result: dict, ref: dict) -> None:
    got = outputs(out, result)
    pd.testing.assert_frame_equal(got["manifest"].drop(columns=["path"]),
                                  ref["manifest"].drop(columns=["path"]))
    pd.testing.assert_frame_equal(got["keys"], ref["keys"])
    # the killed run's own Ray batches the views otherwise, and a float32 convolution over
    # another batch differs in the last bits (measured: at most 4e-6 here)
    np.testing.assert_allclose(got["embeddings"], ref["embeddings"], rtol=1e-3, atol=1e-5)
    assert got["winner"] == ref["winner"]
    pd.testing.assert_frame_equal(got["trials"], ref["trials"])
    np.testing.assert_allclose(got["proba"], ref["proba"], atol=1e-4)
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
    assert not (out / ".dermray.lock").exists()


def killed(config: str, out: Path, point: str) -> None:
    proc = killed_run(config, out, point)
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL
    finally:
        log = reap(proc, out)
    assert Path(str(out) + ".ready").exists(), log[-3000:]


def test_killed_while_writing_the_split_then_rerun(reference, tmp_path):
    """Killed with the manifest written under its temporary name: no manifest, a stale lock and
    the temporary file are left; the rerun (of the split, as `dermray data split` makes it)
    takes the lock over, sweeps the file and writes the reference's manifest exactly."""
    path, _, ref = reference
    out = tmp_path / "out"
    killed(path, out, "replace:manifest.parquet")
    assert not (out / "manifest.parquet").exists() and list(out.glob(".manifest.parquet.*.tmp"))
    assert (out / ".dermray.lock").exists()
    with hold(str(out), "dermray data split"):
        run_split(load_section("data", path, {"out": str(out)}))
    got = pd.read_parquet(out / "manifest.parquet").sort_values("image_id")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ref["manifest"])
    assert not list(out.rglob("*.tmp*")) and not (out / ".dermray.lock").exists()


@pytest.mark.slow
def test_killed_after_the_first_trial_then_rerun(reference, tmp_path):
    """Killed after the first of two trials (on the reference's split and embeddings): the
    rerun resumes the Tune experiment and picks the same winner as the run never killed."""
    config, ref_out, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == ref_out and (
                        n in ("tune", "model", "trials.csv", "metrics.json")
                        or n.startswith((".model", "report")))])
    killed(config, out, "search")
    assert (out / "tune").is_dir() and not (out / "model").exists()
    assert_same(out, rerun(config, out), ref)


@pytest.mark.slow
def test_killed_while_swapping_the_model_keeps_a_model(reference, tmp_path):
    """Killed between building the new model and swapping it in: OUT/model is the previous
    model, whole, at every moment; the rerun swaps in the new one."""
    config, ref_out, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out, symlinks=True)
    before = (out / "model" / "bundle.json").read_text()
    killed(config, out, "replace:model")
    assert (out / "model" / "bundle.json").read_text() == before
    load_bundle(out / "model")
    assert_same(out, rerun(config, out), ref)


@pytest.mark.slow
def test_a_second_writer_is_refused_then_the_killed_first_is_repaired(reference, tmp_path,
                                                                       capsys):
    """Run A pauses after writing its first embeddings; run B on the same OUT is refused
    (exit 2, naming A) and writes nothing; A is then killed -9 and a rerun completes it.
    (A's driver is paused, not its Ray: its actors may go on embedding views meanwhile.)"""
    config, _, ref = reference
    out = tmp_path / "out"
    proc = killed_run(config, out, "extract", pause=True)
    try:
        ready = Path(str(out) + ".ready")
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.exists(), "run A never reached its first batch"
        lock = (out / ".dermray.lock").read_text()
        driver = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
        code = main(["run", "--config", config, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {proc.pid}" in err and "Traceback" not in err
        # B changed nothing of A's: the lock is A's, the files A's driver wrote are as they were
        assert (out / ".dermray.lock").read_text() == lock
        assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == driver
        assert not [p for p in out.rglob(f"*.{os.getpid()}.*")]  # no temp file of B's
    finally:
        log = reap(proc, out)
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    written = len(list((out / "embeddings").rglob("*.parquet")))
    assert written >= 1  # A wrote some views before it died; the rerun adds the rest
    assert_same(out, rerun(config, out), ref)
    record = json.loads((out / "extract_run.json").read_text())
    assert record["views_pending_at_start"] < len(ref["keys"])  # A's views were kept
