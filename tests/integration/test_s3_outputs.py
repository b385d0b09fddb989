"""Every stage with ``--out s3://bucket/prefix`` (moto's S3 server on 127.0.0.1), resume there,
pandas and DuckDB reading the embeddings straight from S3, ``dermray predict --model s3://``, and
a bundle that moves: trained with its weights in one folder, it predicts the same probabilities
after the bundle and the weights are both moved, the weights found by their sha256."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml

from dermray.cli import main
from dermray.errors import DermrayError
from dermray.io import storage
from dermray.models.bundle import load_bundle
from dermray.models.predict_io import expand_inputs, predict_files
from dermray.stages.pipeline import run_pipeline

OUTPUTS = ("manifest.parquet", "extract_run.json", "quarantine.parquet", "trials.csv",
           "metrics.json", "report.md", "report.html", "confusion_matrix.png",
           "model/bundle.json")


def read_csv(uri: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(storage.read_text(uri)))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A real Keras weights file for resnet50 (random values: no download here)."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "r50_random.weights.h5"
    keras.utils.set_random_seed(1)
    keras.applications.ResNet50(include_top=False, weights=None,
                                input_shape=(32, 32, 3)).save_weights(path)
    return path


# a secret in every URI of the run: after it, nothing the run wrote or printed holds it
LEAK = "0wJalrLEAK"
KEY_ID = "AKIALEAKCHECK"
SECRET = f"leak/{LEAK}+x"  # as AWS prints secrets: '/' and '+' in it


def with_secret(uri: str) -> str:
    return uri.replace("s3://", f"s3://{KEY_ID}:{quote(SECRET, safe='')}@", 1)


@pytest.fixture(scope="module")
def s3_run(ray_local, moto_s3, synth_dir, weights_file, tmp_path_factory):
    """`dermray run` (its parser and code, in this process) with the credentials in every URI:
    the data, the images, OUT and the Tune storage path. Its stdout, stderr and dermray's log
    lines are kept for the grep at the end of this module."""
    bucket = moto_s3.bucket("dermray-out")
    for path in synth_dir.rglob("*"):
        if path.is_file():
            moto_s3.client.upload_file(str(path), bucket, f"ham/{path.relative_to(synth_dir)}")
    config = {
        "data": {"metadata": with_secret(moto_s3.uri(bucket, "ham/HAM10000_metadata.csv")),
                 "images": [with_secret(moto_s3.uri(bucket, "ham"))], "seed": 0},
        "extract": {"backbones": ["resnet50"], "weights": {"resnet50": str(weights_file)},
                    "image_size": 32, "batch_size": 16, "augment": False, "tta_views": 1,
                    "jit_compile": False},
        "search": {"families": ["logistic"], "features": ["resnet50"], "num_samples": 2,
                   "storage_path": with_secret(moto_s3.uri(bucket, "runs/one/tune"))},
    }
    path = tmp_path_factory.mktemp("cfg") / "s3.yaml"
    path.write_text(yaml.safe_dump(config))
    out = with_secret(moto_s3.uri(bucket, "runs/one"))
    printed, logged = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setLevel(logging.DEBUG)
    dermray_log = logging.getLogger("dermray")  # beside the CLI's redacting filter, not behind it
    level = dermray_log.level
    dermray_log.addHandler(handler)
    dermray_log.setLevel(logging.DEBUG)
    with pytest.MonkeyPatch.context() as mp:  # the credentials this run adopts go after it
        for name in (*storage.CREDENTIAL_VARS, "AWS_SESSION_TOKEN"):
            if name in os.environ:
                mp.setenv(name, os.environ[name])
            else:
                mp.delenv(name, raising=False)
        mp.setattr(storage, "_adopted", {})
        try:
            with redirect_stdout(printed), redirect_stderr(printed):
                code = main(["run", "--config", str(path), "--out", out])
        finally:
            dermray_log.removeHandler(handler)
            dermray_log.setLevel(level)
        assert code == 0, printed.getvalue()[-3000:]
        result = json.loads(printed.getvalue()[printed.getvalue().index("{\n"):])
        yield out, str(path), result, bucket, printed.getvalue() + logged.getvalue()


def test_every_output_lands_on_s3(s3_run, moto_s3):
    out, _, result, bucket, _ = s3_run
    keys = moto_s3.keys(bucket, "runs/one/")
    for name in OUTPUTS:
        assert f"runs/one/{name}" in keys, name
    parts = [k for k in keys if k.startswith("runs/one/embeddings/backbone=resnet50/split=")]
    assert parts and all(k.endswith(".parquet") for k in parts)
    assert any(k.startswith("runs/one/tune/heads/") for k in keys), "no Tune experiment on S3"
    assert not Path("s3:").exists(), "a local folder named 's3:' was written"
    record = json.loads(storage.read_text(storage.join(out, "extract_run.json")))
    manifest = pd.read_parquet(storage.open_fs(out)[1] + "/manifest.parquet",
                               filesystem=storage.open_fs(out)[0])
    # rows are exact: every planned view (140 originals + 1 TTA view of each val/test image) is
    # an embedding row or a quarantine row, and the actors said who embedded how many
    tta = int((manifest["split"] != "train").sum())
    assert record["views_planned"] == 140 + tta
    assert record["rows"]["resnet50"]["rows"] + record["quarantined"] == record["views_planned"]
    assert sum(a["views"] for a in record["actors"]) == record["views_planned"]
    assert record["weights"]["resnet50"].startswith("sha256:")
    trials = read_csv(storage.join(out, "trials.csv"))
    assert len(trials) == 2 and result["winner"]["family"] == "logistic"


def test_rerun_resumes_on_s3(s3_run, moto_s3):
    out, config, _, bucket, _ = s3_run
    before = moto_s3.keys(bucket, "runs/one/embeddings/")
    trials_before = storage.read_text(storage.join(out, "trials.csv"))
    again = run_pipeline(config, out)
    record = json.loads(storage.read_text(storage.join(out, "extract_run.json")))
    assert record["views_pending_at_start"] == 0 and record["actors"] == []
    assert moto_s3.keys(bucket, "runs/one/embeddings/") == before
    # the finished Tune experiment is restored from S3, not run again: the same trials
    after = read_csv(storage.join(out, "trials.csv"))
    assert sorted(after["trial_id"]) == sorted(pd.read_csv(io.StringIO(trials_before))["trial_id"])
    assert again["winner"]["family"] == "logistic"


def test_pandas_and_duckdb_read_embeddings_from_s3(s3_run):
    duckdb = pytest.importorskip("duckdb")
    out, *_ = s3_run
    fs, root = storage.open_fs(storage.join(out, "embeddings", "backbone=resnet50"))
    frame = pd.read_parquet(root, filesystem=fs)
    assert len(frame) and np.stack(frame["embedding"].to_numpy()).shape[1] == 2048
    # DuckDB scans this Arrow dataset by its variable name (the files carry split themselves)
    embeddings = pads.dataset(root, filesystem=fs, format="parquet")  # noqa: F841
    counts = duckdb.sql("SELECT split, count(*) AS n FROM embeddings GROUP BY split").df()
    assert counts["n"].sum() == len(frame)
    assert set(counts["split"]) == {"train", "val", "test"}


def test_predict_with_an_s3_model_from_the_cli(s3_run, synth_dir, weights_file, tmp_path,
                                               capsys):
    out, *_ = s3_run
    images = sorted((synth_dir / "HAM10000_images_part_1").glob("*.jpg"))[:4]
    csv = tmp_path / "preds.csv"
    # the command's own parser and code, in this process: a `python -m dermray` child would pay
    # TensorFlow's import again (the module entry point is run by tests/unit/test_cli.py)
    code = main(["predict", "--model", storage.join(out, "model"),
                 "--weights-dir", str(weights_file.parent), "--out", str(csv), *map(str, images)])
    assert code == 0, capsys.readouterr().err[-3000:]
    preds = pd.read_csv(csv)
    assert list(preds["image_id"]) == [p.stem for p in images]
    assert np.allclose(preds.filter(like="p_").sum(axis=1), 1.0, atol=1e-3)


def test_bundle_moves_and_finds_its_weights_by_identity(s3_run, synth_dir, weights_file,
                                                       tmp_path):
    out, *_ = s3_run
    model = storage.download_dir(storage.join(out, "model"), tmp_path / "a" / "model")
    weights = tmp_path / "w1"
    weights.mkdir()
    shutil.copy(weights_file, weights / weights_file.name)
    images = expand_inputs([str(synth_dir / "HAM10000_images_part_1")])[:6]
    first, _ = predict_files(load_bundle(model, weights_dirs=[weights]), images)

    moved_model = Path(shutil.move(str(tmp_path / "a"), str(tmp_path / "elsewhere"))) / "model"
    moved_weights = tmp_path / "other" / "weights_here"
    moved_weights.parent.mkdir()
    shutil.move(str(weights), str(moved_weights))
    spec = json.loads((moved_model / "bundle.json").read_text())
    # where training read the file is recorded as a hint (tried first), its sha256 decides; on
    # another machine the hint leads nowhere, as here once the file is hidden
    assert {b["weights_hint"] for b in spec["backbones"]} == {str(weights_file)}
    assert {b["weights_origin"] for b in spec["backbones"]} == {"file"}  # never downloaded
    hidden = weights_file.rename(weights_file.with_suffix(".hidden"))
    try:
        bundle = load_bundle(moved_model, weights_dirs=[moved_weights])
        assert set(bundle.weights.values()) == {str(moved_weights / weights_file.name)}
        again, _ = predict_files(bundle, images)
        np.testing.assert_allclose(again.filter(like="p_").to_numpy(),
                                   first.filter(like="p_").to_numpy(), atol=1e-6)

        # a file of the same name but other content is never used; the error says what to do
        impostor = tmp_path / "impostor"
        impostor.mkdir()
        (impostor / weights_file.name).write_bytes(b"not the weights")
        with pytest.raises(DermrayError, match=r"sha256:[0-9a-f]{64}.*--weights-dir"):
            load_bundle(moved_model, weights_dirs=[impostor])
    finally:
        hidden.rename(weights_file)


def test_no_secret_in_any_output_record_log_or_ray_session(s3_run, moto_s3, tmp_path_factory):
    """Last in this module (after the rerun and the predictions): the secret and the key id are
    in none of the bucket's objects (every output, Tune's tuner.pkl and searcher state
    included), the run's stdout, stderr and log lines, the local files of this test session, or
    Ray's session folder (its logs and the trials' local state)."""
    import ray

    _, config, _, bucket, output = s3_run
    found = []
    for key in moto_s3.keys(bucket):
        data = moto_s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        found += [f"s3://{bucket}/{key}" for s in (LEAK, KEY_ID) if s.encode() in data]
    assert any(k.endswith("tuner.pkl") for k in moto_s3.keys(bucket, "runs/one/tune/"))
    found += [f"output: {s}" for s in (LEAK, KEY_ID) if s in output]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    local = [session, tmp_path_factory.getbasetemp()]
    files = [p for root in local for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        if path == Path(config):
            continue  # the config file this test wrote, with the secret in it on purpose
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a socket, or gone
        found += [str(path) for s in (LEAK, KEY_ID) if s.encode() in data]
    assert len(files) > 100 and found == []
