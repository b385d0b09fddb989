"""The catalog on s3:// URIs, against moto's S3 server on 127.0.0.1 (no AWS)."""

import pytest

from dermray.catalog import build_catalog


@pytest.fixture()
def s3_bucket(monkeypatch, synth_dir):
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="ham")
    for path in synth_dir.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "ham", f"data/{path.relative_to(synth_dir)}")
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_catalog_from_s3(s3_bucket):
    meta = f"s3://ham/data/HAM10000_metadata.csv?{s3_bucket}"
    images = f"s3://ham/data?{s3_bucket}"
    cat = build_catalog(meta, [images])
    assert len(cat.frame) == 140
    assert all(p.startswith("s3://ham/data/HAM10000_images_part_") for p in cat.frame["path"])
