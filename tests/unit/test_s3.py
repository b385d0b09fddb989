"""The catalog on s3:// URIs, against moto's S3 server on 127.0.0.1 (no AWS)."""

from dermray.data.catalog import build_catalog


def test_catalog_from_s3(moto_s3, synth_dir):
    bucket = moto_s3.bucket("ham")
    for path in synth_dir.rglob("*"):
        if path.is_file():
            moto_s3.client.upload_file(str(path), bucket, f"data/{path.relative_to(synth_dir)}")
    cat = build_catalog(moto_s3.uri(bucket, "data/HAM10000_metadata.csv"),
                        [moto_s3.uri(bucket, "data")])
    assert len(cat.frame) == 140
    assert all(p.startswith("s3://ham/data/HAM10000_images_part_") for p in cat.frame["path"])


def test_credentials_in_a_uri_are_never_shown(capsys):
    from dermray.cli import main
    from dermray.io.storage import display, redact

    uri = "s3://AKIAEXAMPLE:wJalr%2Fhush42@ham/data/m.csv?region=us-east-1"
    assert display(uri) == "s3://***@ham/data/m.csv"
    assert redact(f"cannot open {uri}: x") == "cannot open s3://***@ham/data/m.csv?region=us-east-1: x"
    assert redact("s3://ham/img@2x.jpg") == "s3://ham/img@2x.jpg"  # an '@' in a key stays
    # a URI pyarrow cannot parse: exit 2, a message, no secret anywhere
    assert main(["data", "validate", "--metadata",
                 "s3://AKIAEXAMPLE:wJalr/hush42@ham/m.csv?region=us-east-1&bogus=1"]) == 2
    captured = capsys.readouterr()
    assert "Cannot open s3://ham/m.csv" in captured.err
    assert "hush42" not in captured.err + captured.out and "AKIAEXAMPLE" not in captured.err


def test_credentials_are_read_out_of_the_uri_once(moto_s3, synth_dir, capsys):
    """KEY:SECRET@ (percent-encoded or not) leaves every URI it is in, and becomes the process's
    S3 credentials: the filesystem reads them from the environment, so nothing that pickles it
    (Tune does) carries them; a second, different pair is refused; another scheme's credentials
    are refused."""
    import os
    import pickle

    import pytest

    from dermray.cli import main
    from dermray.errors import StorageError
    from dermray.io import storage

    bucket = moto_s3.bucket("creds")
    moto_s3.client.upload_file(str(synth_dir / "HAM10000_metadata.csv"), bucket, "m.csv")
    for secret in ("wJalr%2Fhush42%2Bx", "wJalr/hush42+x"):  # encoded, and as AWS prints it
        uri = moto_s3.uri(bucket, "m.csv").replace("s3://", f"s3://AKIAEXAMPLE:{secret}@")
        clean = storage.strip_credentials({"out": [uri]})["out"][0]
        assert clean == moto_s3.uri(bucket, "m.csv")
        assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (
            "AKIAEXAMPLE", "wJalr/hush42+x")
        fs, _ = storage.open_fs(uri)
        assert b"hush42" not in pickle.dumps(fs)
        assert storage.join(uri, "a") == moto_s3.uri(bucket, "m.csv/a")
        assert storage.read_bytes(uri) == (synth_dir / "HAM10000_metadata.csv").read_bytes()
    with pytest.raises(StorageError, match="other credentials"):
        storage.strip_credentials("s3://AKIAOTHER:other@b/k")
    with pytest.raises(StorageError, match="MLFLOW_TRACKING_USERNAME"):
        storage.strip_credentials("https://user:hush42@mlflow.example/")
    # the command: the run reads the file with the URI's credentials; nothing prints them
    assert main(["data", "validate", "--metadata", moto_s3.uri(bucket, "m.csv").replace(
        "s3://", "s3://AKIAEXAMPLE:wJalr%2Fhush42%2Bx@")]) == 2  # no images there: a message
    captured = capsys.readouterr()
    assert "hush42" not in captured.err + captured.out and "AKIAEXAMPLE" not in captured.err
    assert "s3://creds/" in captured.err


def test_log_lines_are_redacted():
    import logging

    from dermray.io.storage import RedactingFilter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "reading %s", ("s3://K:S@b/k",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "reading s3://***@b/k"


def test_a_silent_endpoint_fails_in_seconds(monkeypatch):
    """A server that accepts connections and never answers: a clear error after
    attempts x request timeout (1 x 1 s here; 2 x 3 s by default), not pyarrow's 100 s."""
    import socket
    import threading
    import time

    import pytest

    from dermray.errors import CatalogError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    monkeypatch.setenv("DERMRAY_S3_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("DERMRAY_S3_MAX_ATTEMPTS", "1")
    port = server.getsockname()[1]
    uri = (f"s3://KEY:hush42@ham/m.csv?endpoint_override=127.0.0.1:{port}&scheme=http"
           "&region=us-east-1")
    start = time.monotonic()
    with pytest.raises(CatalogError) as err:
        build_catalog(uri, ["s3://ham/?region=us-east-1"])
    assert time.monotonic() - start < 10  # a bound, not a benchmark: the old default took 100 s
    assert "did not answer (1 attempt(s), 1 s each)" in str(err.value)
    assert "hush42" not in str(err.value) and "s3://***@ham/m.csv" in str(err.value)
    server.close()


def test_s3_filesystems_get_short_timeouts(monkeypatch):
    from dermray.io.storage import open_fs

    monkeypatch.delenv("DERMRAY_S3_CONNECT_TIMEOUT", raising=False)
    fs, path = open_fs("s3://b/k?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    options = fs.__reduce__()[1][0]
    assert (options["connect_timeout"], options["endpoint_override"], path) == (3.0, "127.0.0.1:9", "b/k")


def test_an_s3_failure_in_any_stage_is_a_message(moto_s3, synth_dir, capsys):
    """An output bucket that does not exist: the split's write fails in pyarrow; exit 2."""
    from dermray.cli import main

    meta = str(synth_dir / "HAM10000_metadata.csv")
    out = moto_s3.uri("no-such-bucket", "out").replace("s3://", "s3://K1:hush42@")
    assert main(["data", "split", "--metadata", meta, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Cannot access S3" in err and "hush42" not in err


def test_a_list_files_uris_lose_their_credentials(tmp_path):
    """predict's inputs from a list file: the rows' path column never holds a secret."""
    from dermray.stages.predict import expand_inputs

    listing = tmp_path / "inputs.txt"
    listing.write_text("s3://AKIAEXAMPLE:hush42@ham/a.jpg?region=us-east-1\nb.jpg\n")
    assert expand_inputs([str(listing)]) == ["s3://ham/a.jpg?region=us-east-1",
                                             str(tmp_path / "b.jpg")]


def test_an_s3_out_is_probed_before_predicting(moto_s3, tmp_path, capsys):
    """A bucket that refuses the write is a message before the model is read; on a writable
    one the probe is gone (pyarrow leaves an empty folder marker where the output goes)."""
    from dermray.cli import main
    from dermray.io import storage

    bucket = moto_s3.bucket("writable")
    storage.check_writable(moto_s3.uri(bucket, "preds/out.csv"))
    assert moto_s3.keys(bucket) == ["preds/"]
    image = tmp_path / "i.jpg"
    image.write_bytes(b"x")
    code = main(["predict", "--model", str(tmp_path / "no_model"), "--out",
                 moto_s3.uri("no-such-bucket", "preds.csv"), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot write s3://no-such-bucket/preds.csv" in err, err
