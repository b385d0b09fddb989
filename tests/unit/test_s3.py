"""The catalog on s3:// URIs, against moto's S3 server on 127.0.0.1 (no AWS)."""

from dermray.catalog import build_catalog


def test_catalog_from_s3(moto_s3, synth_dir):
    bucket = moto_s3.bucket("ham")
    for path in synth_dir.rglob("*"):
        if path.is_file():
            moto_s3.client.upload_file(str(path), bucket, f"data/{path.relative_to(synth_dir)}")
    cat = build_catalog(moto_s3.uri(bucket, "data/HAM10000_metadata.csv"),
                        [moto_s3.uri(bucket, "data")])
    assert len(cat.frame) == 140
    assert all(p.startswith("s3://ham/data/HAM10000_images_part_") for p in cat.frame["path"])
