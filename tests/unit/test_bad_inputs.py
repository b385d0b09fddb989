"""The bad-input corpus: hostile and broken inputs, each ending in exit 2 with a message naming
the file, row or field, or in a reported (and later quarantined) row. Counts per problem kind are
exact, and they reconcile: rows in = rows clean + rows reported. No Ray."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermray.cli import main
from dermray.data.augment import decode_batch
from dermray.data.catalog import build_catalog
from dermray.data.synth import write_synth_dataset
from dermray.errors import CatalogError

REPO = Path(__file__).resolve().parents[2]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk
            + zlib.crc32(chunk).to_bytes(4, "big") + b"\x00" * 64)


# the damaged files, by the row (0-based, of the synthetic metadata) whose image they replace
FILE_DAMAGE = {3: "zero-byte", 5: "text", 7: "truncated", 9: "huge png"}
FILE_KINDS = {"zero-byte": "zero-byte image", "text": "not an image",
              "truncated": "truncated image", "huge png": "image too large"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """35 synthetic rows plus: a duplicate image_id, an unknown dx, a bad age, a bad sex,
    a zero-byte JPEG, a text file named .jpg, a truncated JPEG, a PNG header of 50000x50000
    named .jpg, and an image on disk that the metadata does not list."""
    root = tmp_path_factory.mktemp("corpus")
    write_synth_dataset(root, n=35, seed=2, size=(24, 18))
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    paths = {p.stem: p for p in root.glob("HAM10000_images_part_*/*.jpg")}
    for row, kind in FILE_DAMAGE.items():
        path = paths[meta.loc[row, "image_id"]]
        data = path.read_bytes()
        path.write_bytes({"zero-byte": b"", "text": b"lesion notes, not a picture\n",
                          "truncated": data[: len(data) // 2],
                          "huge png": _png_header(50_000, 50_000)}[kind])
    meta["age"] = meta["age"].astype(object)
    meta.loc[11, "age"] = 240
    meta.loc[12, "sex"] = "X"
    extra_dx = meta.iloc[[13]].assign(image_id="ISIC_0099999", dx="cancer", lesion_id="HAM_0099999")
    shutil_copy(paths[meta.loc[13, "image_id"]], root / "HAM10000_images_part_1" / "ISIC_0099999.jpg")
    duplicate = meta.iloc[[14]]
    shutil_copy(paths[meta.loc[15, "image_id"]], root / "HAM10000_images_part_2" / "ISIC_0088888.jpg")
    pd.concat([meta, extra_dx, duplicate], ignore_index=True).to_csv(root / "bad.csv", index=False)
    meta.to_csv(root / "fixed.csv", index=False)  # the same without the two error rows
    (root / "header_only.csv").write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    return root


def shutil_copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


def test_corpus_counts_per_kind_and_reconcile(corpus, tmp_path):
    rows_in = len(pd.read_csv(corpus / "bad.csv"))
    with pytest.raises(CatalogError) as err:
        build_catalog(str(corpus / "bad.csv"), [str(corpus)])
    expected = {"dx not a class": 1, "duplicate image_id": 1, "implausible age": 1,
                "sex not in the HAM10000 list": 1, **{k: 1 for k in FILE_KINDS.values()}}
    assert err.value.counts == expected
    assert err.value.rows == rows_in == 37
    assert err.value.rows_reported == 8  # each problem on its own row
    text = str(err.value)
    for row in FILE_DAMAGE:  # every damaged file is named
        assert pd.read_csv(corpus / "bad.csv").loc[row, "image_id"] + ".jpg" in text

    # the command: exit 2, the errors and the warnings, no traceback
    proc = subprocess.run([sys.executable, "-m", "dermray", "data", "validate", "--metadata",
                           str(corpus / "bad.csv"), "--images", str(corpus)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 problem(s)" in proc.stderr and "6 warning(s)" in proc.stderr

    # without the two error rows: valid, six rows reported and kept, counts reconcile
    cat = build_catalog(str(corpus / "fixed.csv"), [str(corpus)])
    summary = cat.summary()
    assert summary["problem_counts"] == {k: v for k, v in expected.items()
                                         if k not in ("dx not a class", "duplicate image_id")}
    assert summary["rows"] == 35 == summary["rows_clean"] + summary["rows_reported"]
    assert summary["rows_reported"] == 6
    assert any("ISIC_0088888" in w for w in cat.warnings)  # on disk, not listed

    assert main(["data", "split", "--metadata", str(corpus / "fixed.csv"), "--images",
                 str(corpus), "--out", str(tmp_path / "out")]) == 0
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == summary["rows"]  # nothing dropped silently

    # what extract does with the damaged files: a quarantine reason naming each one
    bad = manifest[manifest["image_id"].isin(pd.read_csv(corpus / "fixed.csv")
                                             .loc[list(FILE_DAMAGE), "image_id"])]
    batch = {"image_id": bad["image_id"].to_numpy(object), "path": bad["path"].to_numpy(object),
             "split": np.full(len(bad), "val", object), "aug_index": np.zeros(len(bad), int)}
    reasons = decode_batch(batch, 32, seed=0)["error"]
    assert all(r.startswith(p + ": ") for r, p in zip(reasons, bad["path"]))
    assert not any("BytesIO" in r for r in reasons)


def test_header_only_metadata_exits_2(corpus, capsys):
    assert main(["data", "validate", "--metadata", str(corpus / "header_only.csv"),
                 "--images", str(corpus)]) == 2
    assert "header_only.csv: a header but no rows" in capsys.readouterr().err


def _bad_weights(tmp: Path) -> str:
    (tmp / "w.h5").write_text("<html>404</html>")
    return f"resnet50={tmp / 'w.h5'}"


# argv (with {tmp} for a scratch folder) -> a fragment the message must hold
BAD_COMMANDS = [
    (["data", "validate", "--metadata", "{tmp}/none.csv"], "Cannot read the metadata file"),
    (["data", "validate", "--metadata", "{tmp}/binary.csv"], "binary.csv"),
    (["data", "validate", "--metadata", "{tmp}/empty.csv"], "is not a readable CSV"),
    (["data", "validate", "--metadata", "{tmp}/cols.csv"], "missing column(s) lesion_id, dx"),
    (["data", "validate", "--metadata", "{tmp}/cols.csv", "--images", "{tmp}/nope"],
     "missing column(s) lesion_id, dx"),
    (["data", "synth", "--dest", "{tmp}/s", "--size", "0x0"], "--size must be WIDTHxHEIGHT"),
    (["data", "synth", "--dest", "{tmp}/s", "--size", "abc"], "Got 'abc'"),
    (["data", "synth", "--dest", "{tmp}/s", "--n", "0"], "Got 0 instead"),
    (["extract", "--manifest", "m", "--out", "{tmp}/o", "--backbone", "resnet50", "--backbone",
      "resnet50"], "extract.backbones must be a list without repeats"),
    (["extract", "--manifest", "m", "--out", "{tmp}/o", "--weights", "WEIGHTS"],
     "not an HDF5 file"),
    (["extract", "--manifest", "m", "--out", "{tmp}/o", "--weights", "resnet50"],
     "--weights takes NAME=PATH"),
    (["extract", "--manifest", "m", "--out", "{tmp}/o", "--image-size", "0"],
     "extract.image_size must be an integer in [32, 1024]"),
    (["search", "--out", "{tmp}/o", "--num-samples", "0"], "search.num_samples must be >= 1"),
    (["run", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/o"], "does not exist"),
    (["data", "validate", "--metadata", "s3://AKIA1:hush42@b/m.csv?region=us-east-1&bogus=1"],
     "Cannot open s3://b/m.csv"),  # the credentials are out of the URI before it is opened
]


def test_every_bad_command_is_a_message(tmp_path, capsys):
    """Every case: exit 2, the message names the file, key or value; no secret echoed."""
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "cols.csv").write_text("image_id,age\nISIC_0000001,40\n")
    clear = 0
    for argv, fragment in BAD_COMMANDS:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        argv = [_bad_weights(tmp_path) if a == "WEIGHTS" else a for a in argv]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert fragment in err, (argv, err)
        assert "hush42" not in err
        clear += 1
    assert clear == len(BAD_COMMANDS) == 15
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


# issue 22's probes, each a config section and the command run with it: the run must end in a
# message (exit 2) before it creates or deletes anything, inside OUT or out of it
PROBES = [
    # --fresh with an experiment two levels up once deleted that folder, and Tune wrote there
    ("search:\n  experiment: ../../x\n", "search.experiment must be one folder name"),
    ("search:\n  experiment: ..\n", "search.experiment must be one folder name"),
    ("search:\n  experiment: a/b\n", "search.experiment must be one folder name"),
    # storage_path plus an empty name once deleted the whole folder of other experiments
    ("search:\n  storage_path: {tmp}/x\n  experiment: ''\n",
     "search.experiment must be one folder name"),
    ("search:\n  storage_path: {tmp}/x\n  experiment: .\n",
     "search.experiment must be one folder name"),
    # an alias bomb of 314 bytes: 9**8 strings once expanded (33 s and 1.6 GB before, in the
    # message that quoted the value)
    ("search:\n  experiment: [" + ", ".join(
        ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [f"&{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefg", "bcdefgh")])
     + "]\n", "{file}, line 2: this part of the file expands (through its aliases"),
    ("search:\n  features: &loop [a, *loop]\n", "{file}, line 2: an alias refers to a node"),
    # duplicate keys, which YAML resolves silently to the last one
    ("search:\n  num_samples: 2\n  num_samples: 30\n",
     "{file}, line 3: the key 'num_samples' is given twice (first on line 2)"),
    ("search:\n  num_samples: 2\nsearch:\n  num_samples: 30\n",
     "{file}, line 3: the key 'search' is given twice (first on line 1)"),
    ("search: {num_samples: 2, num_samples: 30}\n", "{file}, line 1: the key 'num_samples'"),
    (b"search:\n  experiment: \xff\xfe\n", "is not UTF-8 text"),
    ("search:\n  num_samples: 2\n" + "#" * (1 << 20), "a config file is at most"),
]


def test_every_probe_ends_in_a_message_and_touches_nothing(tmp_path, capsys):
    """Tried, ended exactly, ended in a message: every probe here ends in a message, and the
    tree around OUT (a folder of other experiments two levels up included) is unchanged."""
    victim = tmp_path / "x"
    (victim / "other_experiment").mkdir(parents=True)
    (victim / "other_experiment" / "tuner.pkl").write_bytes(b"someone else's")
    out = tmp_path / "a" / "out"
    tried = messages = 0
    for i, (text, fragment) in enumerate(PROBES):
        config = tmp_path / f"probe{i}.yaml"
        if isinstance(text, bytes):
            config.write_bytes(text)
        else:
            config.write_text(text.replace("{tmp}", str(tmp_path)))
        before = sorted(tmp_path.rglob("*"))
        code = main(["search", "--config", str(config), "--out", str(out), "--fresh"])
        err = capsys.readouterr().err
        tried += 1
        fragment = fragment.replace("{file}", str(config))
        assert code == 2 and fragment in err and "Traceback" not in err, (text[:200], err)
        messages += 1
        assert sorted(tmp_path.rglob("*")) == before, text
    assert (tried, messages) == (len(PROBES), len(PROBES))


def test_a_changed_search_is_refused_before_ray_starts(synth_manifest, tmp_path, monkeypatch):
    """The search's fingerprint is checked before Ray starts (30 s) and before the data loads."""
    from dermray.config import SearchConfig
    from dermray.io.fingerprint import StaleOutputError
    from dermray.stages import search

    started = []
    monkeypatch.setattr(search, "ensure_ray", lambda: started.append("ray"))
    monkeypatch.setattr(search, "load_search_data", lambda *a: started.append("data"))
    out = tmp_path / "out"
    old = SearchConfig(out=str(out), families=("logistic",), features=("resnet50",), seed=0)
    new = SearchConfig(out=str(out), families=("logistic",), features=("resnet50",), seed=1)
    root = search.storage_path(old)
    search.claim(f"{root}/heads", "search", search.search_fingerprint(old, str(synth_manifest)),
                 root=root)
    with pytest.raises(StaleOutputError, match="settings.seed: 0 -> 1"):
        search.run_search(new, str(synth_manifest))
    assert started == []


# an output that cannot be written: refused before the model is even read (the model named
# here does not exist, so a check made after loading it would give another message)
OUT_PROBES = [
    ("{tmp}", "it is a folder"),
    ("{tmp}/afile/preds.csv", "Cannot write {tmp}/afile/preds.csv"),
    ("/proc/dermray-preds.csv", "Cannot write /proc/dermray-preds.csv"),
]


def test_an_unwritable_out_is_refused_before_predicting(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    image = tmp_path / "i.jpg"
    image.write_bytes(b"x")
    for out, fragment in OUT_PROBES:
        out, fragment = (x.replace("{tmp}", str(tmp_path)) for x in (out, fragment))
        for ray_flag in ("--no-ray", "--ray"):
            code = main(["predict", "--model", str(tmp_path / "no_model"), "--out", out,
                         ray_flag, str(image)])
            err = capsys.readouterr().err
            assert code == 2 and fragment in err and "Traceback" not in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "i.jpg"]  # no probe left


# issue 20: an OUT, --out or input path that cannot be used, each ending in one `error:` line
# with exit 2 and no traceback, before Ray starts ({demo}: the shipped demo config; {meta}: the
# synthetic metadata; {manifest}: a folder holding only a manifest, no embeddings)
BAD_PATHS = [
    (["run", "--config", "{demo}", "--out", "/proc/dermray-x"], "/proc/dermray-x"),
    (["run", "--config", "{demo}", "--out", "{tmp}/afile/out"], "{tmp}/afile/out"),
    (["extract", "--config", "{demo}", "--manifest", "{tmp}/m.parquet", "--out",
      "/proc/dermray-x"], "/proc/dermray-x"),
    (["extract", "--config", "{demo}", "--manifest", "{tmp}/none.parquet", "--out", "{tmp}/o4"],
     "{tmp}/none.parquet"),
    (["search", "--config", "{demo}", "--out", "/proc/dermray-x"], "/proc/dermray-x"),
    (["search", "--config", "{demo}", "--out", "{tmp}/afile"], "{tmp}/afile"),
    (["search", "--config", "{demo}", "--out", "{tmp}/empty"], "No manifest at {tmp}/empty"),
    (["search", "--config", "{demo}", "--out", "{manifest}"], "No embeddings in {manifest}"),
    (["search", "--config", "{demo}", "--out", "{tmp}/o3", "--manifest", "/proc/nope.parquet"],
     "No manifest at /proc/nope.parquet"),
    (["data", "split", "--metadata", "{meta}", "--out", "/proc/dermray-x"], "/proc/dermray-x"),
    (["data", "split", "--metadata", "{meta}", "--out", "{tmp}/afile/out"], "{tmp}/afile/out"),
    (["data", "validate", "--metadata", "{tmp}/afile/m.csv"], "{tmp}/afile/m.csv"),
    (["explain", "--model", "{tmp}/no_model", "--out", "/proc/dermray-x", "{tmp}/i.jpg"],
     "/proc/dermray-x"),
    (["predict", "--model", "{tmp}/afile", "--no-ray", "{tmp}/i.jpg"], "{tmp}/afile"),
    (["predict", "--model", "{tmp}/no_model", "--no-ray", "{tmp}/i.jpg"], "{tmp}/no_model"),
    (["report", "/proc/dermray-x"], "/proc/dermray-x"),
    (["report", "{tmp}/afile"], "{tmp}/afile"),
]


def test_every_bad_path_is_one_error_line_before_ray(synth_dir, synth_manifest, tmp_path,
                                                     capsys, monkeypatch):
    """Tried, and ended in a message: exit 2, one `error:` line naming the path, no traceback,
    and Ray never started (a search on an OUT without embeddings fails at once, not after
    Ray's 30 s start)."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "i.jpg").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    holding = tmp_path / "manifest_only"
    holding.mkdir()
    holding.joinpath("manifest.parquet").write_bytes(synth_manifest.read_bytes())
    fill = {"{demo}": str(REPO / "ray_jobs/configs/demo.yaml"), "{tmp}": str(tmp_path),
            "{meta}": str(synth_dir / "HAM10000_metadata.csv"), "{manifest}": str(holding)}
    tried = messages = 0
    for argv, fragment in BAD_PATHS:
        for key, value in fill.items():
            argv = [a.replace(key, value) for a in argv]
            fragment = fragment.replace(key, value)
        tried += 1
        code = main(argv)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (argv, err)
        assert "Traceback" not in err, (argv, err)
        messages += 1
    assert (tried, messages) == (len(BAD_PATHS), 17)
