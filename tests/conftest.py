"""Shared fixtures: the synthetic dataset, the real data in ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep TensorFlow quiet and on the CPU in tests
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# fake AWS credentials for moto, set before any Ray worker starts (workers inherit them); no
# test reaches real AWS, and no instance-metadata lookup makes a silent endpoint hang
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value
os.environ.pop("AWS_PROFILE", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMRAY_SHARED", REPO.parent / "shared"))
HAM = SHARED / "data" / "ham10000"
WEIGHTS = SHARED / "weights"
RESNET50_WEIGHTS = WEIGHTS / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(autouse=True)
def _aws_credentials_restored():
    """A test that reads credentials out of an s3:// URI (dermray adopts them into the
    environment) leaves the session's fake ones behind it."""
    from dermray.io import storage

    saved = {k: os.environ.get(k) for k in (*storage.CREDENTIAL_VARS, "AWS_SESSION_TOKEN")}
    adopted = dict(storage._adopted)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._adopted.clear()
    storage._adopted.update(adopted)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not present (real data/weights live in ../shared on dev machines)")
    return path


@pytest.fixture(scope="session")
def ham() -> Path:
    return need(HAM)


@pytest.fixture(scope="session")
def resnet50_weights() -> Path:
    return need(RESNET50_WEIGHTS)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """140 small synthetic images in the Dataverse layout, shared by the whole session."""
    from dermray.data.synth import write_synth_dataset

    dest = tmp_path_factory.mktemp("synth")
    write_synth_dataset(dest, n=140, seed=0, size=(64, 48))
    return dest


@pytest.fixture(scope="session")
def synth_manifest(synth_dir, tmp_path_factory) -> Path:
    """The split of the synthetic dataset: OUT/manifest.parquet."""
    from dermray.config import DataConfig
    from dermray.stages.pipeline import run_split

    out = tmp_path_factory.mktemp("synth_out")
    cfg = DataConfig(metadata=str(synth_dir / "HAM10000_metadata.csv"), images=(str(synth_dir),),
                     out=str(out), seed=0)
    path, _ = run_split(cfg)
    return Path(path)


class MotoS3:
    """moto's S3 server on 127.0.0.1: ``uri(bucket, key)`` gives an s3:// URI pyarrow (and so
    every dermray stage) reaches it with."""

    def __init__(self, host: str, port: int) -> None:
        import boto3

        self.endpoint = f"http://{host}:{port}"
        self.query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        self.client = boto3.client("s3", endpoint_url=self.endpoint)

    def uri(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}".rstrip("/") + f"?{self.query}"

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def moto_s3():
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    yield MotoS3(*server.get_host_and_port())
    server.stop()
