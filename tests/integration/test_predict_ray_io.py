"""The Ray predict job's pure pieces, without Ray: inputs from a folder, a list file and an s3://
prefix (moto's S3 server); reads with the byte limit, on S3 too; the output written whole or not
at all, locally and on S3."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.errors import DermrayError
from dermray.models.predict_io import PredictionWriter, decode_files, expand_inputs, split_rows


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "JPEG")
    return buf.getvalue()


def test_inputs_from_a_folder_a_list_file_and_an_s3_prefix(tmp_path, moto_s3):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg((200, 0, 0)))
    (tmp_path / "imgs" / "sub" / "b.PNG").write_bytes(b"x")
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    listed = tmp_path / "list.txt"
    listed.write_text("# comment\n\nimgs/a.jpg\n/abs/c.jpg\ns3://bkt/x.jpg\n")
    bucket = moto_s3.bucket("predict-in")
    for key in ("new/1.jpg", "new/deeper/2.jpeg", "new/readme.txt", "other/3.jpg"):
        moto_s3.client.put_object(Bucket=bucket, Key=key, Body=jpeg((0, 0, 200)))
    found = expand_inputs([str(tmp_path / "imgs"), str(listed), moto_s3.uri(bucket, "new")])
    local = [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "sub" / "b.PNG")]
    assert found[:2] == local
    assert found[2:5] == [str(tmp_path / "imgs/a.jpg"), "/abs/c.jpg", "s3://bkt/x.jpg"]
    assert [f.partition("?")[0] for f in found[5:]] == [f"s3://{bucket}/new/1.jpg",
                                                        f"s3://{bucket}/new/deeper/2.jpeg"]

    # those S3 URIs read (with their query: the endpoint) and decode like local files
    batch = decode_files({"path": np.asarray([*found[5:], local[1]], dtype=object)},
                         image_size=32, max_bytes=10_000, max_pixels=10_000)
    assert batch["image"].shape == (3, 32, 32, 3) and list(batch["error"][:2]) == ["", ""]
    assert batch["image"][0, 16, 16, 2] > 150  # blue, as uploaded
    assert "unreadable or not an image" in batch["error"][2]
    small = decode_files({"path": np.asarray(found[5:6], dtype=object)}, image_size=32,
                         max_bytes=100, max_pixels=10_000)
    assert "over the limit of 100 bytes" in small["error"][0]


def rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(n)], "image_id": [str(i) for i
                                                                              in range(n)],
                         "dx": "nv", "policy": "accuracy", "p_nv": np.linspace(0, 1, n),
                         "error": ["" if i % 3 else "bad" for i in range(n)]})


def test_the_output_is_written_whole_or_not_at_all(tmp_path, moto_s3):
    kept, problems = split_rows(rows(6))
    assert len(kept) == 4 and "error" not in kept and problems[0] == "/x/0.jpg: bad; skipped"
    target = tmp_path / "out" / "preds.parquet"
    with PredictionWriter(str(target)) as writer:
        writer.write(kept[:2])
        writer.write(kept[2:])
        assert not target.exists()  # a temporary name until complete
    pd.testing.assert_frame_equal(pd.read_parquet(target), kept, check_dtype=False)
    with pytest.raises(RuntimeError), PredictionWriter(str(tmp_path / "failed.csv")) as writer:
        writer.write(kept)
        raise RuntimeError("a batch failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # nothing left of the failed one

    bucket = moto_s3.bucket("predict-out")
    with PredictionWriter(moto_s3.uri(bucket, "run/preds.csv")) as writer:
        writer.write(kept)
    assert moto_s3.keys(bucket) == ["run/preds.csv"]
    body = moto_s3.client.get_object(Bucket=bucket, Key="run/preds.csv")["Body"].read()
    assert len(pd.read_csv(io.BytesIO(body))) == 4
    with pytest.raises(DermrayError, match="Parquet output needs --out"):
        PredictionWriter(None, "parquet")
