"""Every stage with ``--out s3://bucket/prefix`` (moto's S3 server on 127.0.0.1), resume there,
pandas and DuckDB reading the embeddings straight from S3, ``dermray predict --model s3://``, and
a bundle that moves: trained with its weights in one folder, it predicts the same probabilities
after the bundle and the weights are both moved, the weights found by their sha256."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

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


@pytest.fixture(scope="module")
def s3_run(ray_local, moto_s3, synth_dir, weights_file, tmp_path_factory):
    bucket = moto_s3.bucket("dermray-out")
    for path in synth_dir.rglob("*"):
        if path.is_file():
            moto_s3.client.upload_file(str(path), bucket, f"ham/{path.relative_to(synth_dir)}")
    config = {
        "data": {"metadata": moto_s3.uri(bucket, "ham/HAM10000_metadata.csv"),
                 "images": [moto_s3.uri(bucket, "ham")], "seed": 0},
        "extract": {"backbones": ["resnet50"], "weights": {"resnet50": str(weights_file)},
                    "image_size": 32, "batch_size": 16, "augment": False, "tta_views": 1,
                    "jit_compile": False},
        "search": {"families": ["logistic"], "features": ["resnet50"], "num_samples": 2},
    }
    path = tmp_path_factory.mktemp("cfg") / "s3.yaml"
    path.write_text(yaml.safe_dump(config))
    out = moto_s3.uri(bucket, "runs/one")
    result = run_pipeline(str(path), out)
    return out, str(path), result, bucket


def test_every_output_lands_on_s3(s3_run, moto_s3):
    out, _, result, bucket = s3_run
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
    out, config, _, bucket = s3_run
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
    assert str(weights_file) not in json.dumps(spec), "the bundle records a machine's path"
    bundle = load_bundle(moved_model, weights_dirs=[moved_weights])
    again, _ = predict_files(bundle, images)
    np.testing.assert_allclose(again.filter(like="p_").to_numpy(),
                               first.filter(like="p_").to_numpy(), atol=1e-6)

    # a file of the same name but other content is never used; the error says what to do
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    (impostor / weights_file.name).write_bytes(b"not the weights")
    with pytest.raises(DermrayError, match=r"sha256:[0-9a-f]{64}.*--weights-dir"):
        load_bundle(moved_model, weights_dirs=[impostor])
