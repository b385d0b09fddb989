"""The bad-input corpus: hostile and broken inputs, each ending in exit 2 with a message naming
the file, row or field, or in a reported (and later quarantined) row. Counts per problem kind are
exact, and they reconcile: rows in = rows clean + rows reported. No Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermray.cli import main
from dermray.data.augment import decode_batch
from dermray.data.catalog import build_catalog
from dermray.data.synth import write_synth_dataset
from dermray.errors import CatalogError, DermrayError

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


def test_a_changed_first_point_is_refused_like_a_changed_setting(synth_manifest, tmp_path,
                                                                  monkeypatch):
    """A family's first point is code, not config: a release that changes it (the logistic's C
    0.1 -> 0.003 on 2026-12-03) must not resume an experiment searched from the old one."""
    import dataclasses

    from dermray.config import SearchConfig
    from dermray.io.fingerprint import StaleOutputError
    from dermray.models.heads import logistic
    from dermray.models.heads.registry import FAMILY_SPECS, get_family
    from dermray.stages import search

    monkeypatch.setattr(search, "ensure_ray", lambda: pytest.fail("Ray started"))
    cfg = SearchConfig(out=str(tmp_path / "out"), families=("logistic",), features=("resnet50",))
    root = search.storage_path(cfg)
    key = search.search_fingerprint(cfg, str(synth_manifest))
    assert key["settings"]["first_points"][0]["logistic_C"] == 0.003
    unseeded = dataclasses.replace(cfg, seed_each_family=False)
    assert search.search_fingerprint(unseeded, str(synth_manifest))["settings"][
        "first_points"] is None
    search.claim(f"{root}/heads", "search", key, root=root)
    monkeypatch.setitem(FAMILY_SPECS, "logistic", dataclasses.replace(
        get_family("logistic"), first_point=lambda c: {**logistic._first_point(c),
                                                       "logistic_C": 0.1}))
    with pytest.raises(StaleOutputError, match="settings.first_points: .*0.003.* -> .*0.1"):
        search.run_search(cfg, str(synth_manifest))


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


# ---- issue 22, round two: the classes left ------------------------------------------------

def _fake_cluster(monkeypatch, nodes, node_types=None, joined=False):
    """Ray's view of a cluster, as ``raysession`` reads it: live nodes (their resources) and,
    on a joined cluster, the autoscaler config's node types (None: it cannot be read)."""
    import ray
    from ray._private import state

    total: dict[str, float] = {}
    for resources in nodes:
        for key, value in resources.items():
            total[key] = total.get(key, 0.0) + value
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "NodeManagerAddress": f"10.0.0.{i}", "Resources": r}
        for i, r in enumerate(nodes, 1)])
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
    if joined:
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    groups = None if node_types is None else SimpleNamespace(node_group_configs=[
        SimpleNamespace(name=n, resources=r, max_count=c) for n, r, c in node_types])
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: groups)


LAPTOP = [{"CPU": 2.0, "memory": 4e9}]
GPU_NODE = [{"CPU": 8.0, "GPU": 1.0}]
AUTOSCALER = [("cpu_head", {"CPU": 4.0}, 1), ("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 4)]

# (cluster, joined, node types, section, settings, None: it runs; else a fragment of the message)
RESOURCE_PROBES = [
    (LAPTOP, False, None, "search", {"cpus_per_trial": 64},
     ("A trial of family 'logistic' (search.cpus_per_trial: 64) asks for CPU 64 per task, but "
     "this local Ray has node 10.0.0.1: CPU 2, GPU 0. Nothing would ever run it")),
    (LAPTOP, False, None, "search", {"cpus_per_trial": 2}, None),
    (LAPTOP, False, None, "search", {"cpus_per_trial": 2.5}, "asks for CPU 2.5 per task"),
    (LAPTOP, False, None, "search",
     {"families": ("finetune",), "family_settings": {"gpus_per_finetune_trial": 1.0}},
     "search.gpus_per_finetune_trial: 1.0) asks for CPU 1, GPU 1 per task"),
    (LAPTOP, False, None, "search",
     {"families": ("cached_cnn",), "family_settings": {"cached_cnn_gpus": 0.25}},
     "Lower search.cpus_per_trial or search.cached_cnn_gpus"),
    (GPU_NODE, False, None, "search",
     {"families": ("finetune",), "family_settings": {"gpus_per_finetune_trial": 2.0}},
     "this local Ray has node 10.0.0.1: CPU 8, GPU 1"),
    (GPU_NODE, False, None, "search", {"families": ("xgboost",), "cpus_per_trial": 8}, None),
    (LAPTOP, False, None, "extract", {"cpus_per_actor": 64},
     ("An embedding actor (extract.cpus_per_actor: 64, extract.num_gpus_per_actor: 0 (auto: 0)) "
     "asks for CPU 64 per task, but this local Ray has node 10.0.0.1: CPU 2, GPU 0")),
    (LAPTOP, False, None, "extract", {"cpus_per_actor": 2}, None),
    (GPU_NODE, False, None, "extract", {"num_gpus_per_actor": 2.0},
     "asks for CPU 1, GPU 2 per task"),
    (LAPTOP, False, None, "extract", {"num_gpus_per_actor": 1.0},
     "this local Ray has no GPU and no autoscaler to add one"),
    # a joined cluster whose autoscaler config names its node types: they decide
    (LAPTOP, True, AUTOSCALER, "search", {"cpus_per_trial": 8}, None),
    (LAPTOP, True, AUTOSCALER, "search", {"cpus_per_trial": 64},
     ("no node or node type of this cluster (its autoscaler config included) has it: node "
     "10.0.0.1: CPU 2, GPU 0; node type cpu_head: CPU 4, GPU 0; node type gpu_worker: CPU 8, "
     "GPU 1")),
    (LAPTOP, True, AUTOSCALER, "extract", {"num_gpus_per_actor": 1.0}, None),
    (LAPTOP, True, AUTOSCALER, "extract", {"num_gpus_per_actor": 1.0, "cpus_per_actor": 16},
     "node type gpu_worker: CPU 8, GPU 1"),
    # a joined cluster whose node types cannot be read: a warning, and it runs (and waits)
    (LAPTOP, True, None, "search", {"cpus_per_trial": 64}, None),
]


def test_unsatisfiable_resources_are_refused_before_the_job(synth_manifest, tmp_path,
                                                            monkeypatch, caplog):
    """Tried / ended exactly / ended in a message: a request no node (nor node type) can ever
    hold is refused before the Tune run or the Ray Data job starts, naming the settings and
    what the cluster has; one that fits goes on to the job (here: the data load / the dataset,
    replaced by a marker)."""
    from dermray.config import ExtractConfig, SearchConfig
    from dermray.stages import extract, search

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(search, "ensure_ray", lambda: None)
    monkeypatch.setattr(search, "load_search_data", started)
    monkeypatch.setattr(extract, "ensure_ray", lambda: None)
    monkeypatch.setattr(extract, "batch_blocks", started)  # the first step of the job
    tried = exactly = messages = 0
    for i, (nodes, joined, types, section, settings, fragment) in enumerate(RESOURCE_PROBES):
        _fake_cluster(monkeypatch, nodes, types, joined)
        out = tmp_path / f"o{i}"
        if section == "search":
            cfg = SearchConfig(**{"out": str(out), "families": ("logistic",),
                                  "features": ("resnet50",), **settings})
            run = lambda cfg=cfg: search.run_search(cfg, str(synth_manifest))
        else:
            cfg = ExtractConfig(**{"out": str(out), "manifest": str(synth_manifest),
                                   "backbones": ("resnet50",), "weights": {"resnet50": "none"},
                                   "image_size": 32, **settings})
            run = lambda cfg=cfg: extract.run_extract(cfg)
        tried += 1
        caplog.clear()
        if fragment is None:
            with pytest.raises(Started):
                run()
            exactly += 1
            if joined and types is None:  # said, not silent
                assert "its autoscaler's node types could not be read" in caplog.text
        else:
            with pytest.raises(DermrayError) as err:
                run()
            assert fragment in str(err.value), (settings, str(err.value))
            messages += 1
    assert (tried, exactly, messages) == (len(RESOURCE_PROBES), 6, 10)


def test_unsatisfiable_resources_exit_2_from_the_command(synth_manifest, tmp_path, monkeypatch,
                                                          capsys):
    """The same through `dermray search`: exit 2, one error line, before the data loads."""
    from dermray.stages import search

    _fake_cluster(monkeypatch, LAPTOP)
    monkeypatch.setattr(search, "ensure_ray", lambda: None)
    monkeypatch.setattr(search, "load_search_data", lambda *a: pytest.fail("the data loaded"))
    out = tmp_path / "out"
    (out / "embeddings" / "backbone=resnet50").mkdir(parents=True)
    (out / "embeddings" / "backbone=resnet50" / "part.parquet").write_bytes(b"")
    shutil.copy(synth_manifest, out / "manifest.parquet")
    config = tmp_path / "c.yaml"
    config.write_text("search:\n  families: [logistic]\n  features: [resnet50]\n"
                      "  cpus_per_trial: 64\n")
    code = main(["search", "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "search.cpus_per_trial: 64" in lines[0], err
    assert "Traceback" not in err


def _header_png(width: int, height: int) -> bytes:
    return _png_header(width, height)


def test_extract_quarantines_what_validate_calls_too_large(corpus, tmp_path):
    """Validate's pixel limit, enforced by extract's decode in validate's words: an image whose
    header is over the limit (7000 x 6000: under PIL's own bomb limit, so PIL would decode it)
    is quarantined with the reason validate reports; the counts reconcile. With a tiny limit a
    real image is refused the same way, and one under it decodes as before."""
    from dermray.data.checks import MAX_PIXELS, check_image_file

    big = tmp_path / "ISIC_0077777.jpg"
    big.write_bytes(_header_png(7000, 6000))
    files = sorted(corpus.glob("HAM10000_images_part_*/*.jpg"))
    real = next(p for p in files if check_image_file(str(p)) is None)
    huge = next(p for p in files if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")  # 50000 x 50000
    paths = [str(big), str(huge), str(real)]
    batch = {"image_id": np.array([Path(p).stem for p in paths], object),
             "path": np.array(paths, object), "split": np.full(3, "val", object),
             "aug_index": np.zeros(3, int)}
    tried = exactly = messages = 0
    decoded = decode_batch(batch, 32, seed=0)
    for path, reason in zip(paths, decoded["error"]):
        tried += 1
        problem = check_image_file(path)
        if problem is None:  # validate keeps it: extract decodes it
            assert reason == ""
            exactly += 1
            continue
        kind, detail = problem
        assert kind == "image too large" and reason == f"{path}: image too large: {detail}"
        messages += 1
    assert decoded["error"][0].endswith(f"7000x6000 pixels, over {MAX_PIXELS}")
    rows_in = len(paths)
    assert rows_in == (decoded["error"] == "").sum() + (decoded["error"] != "").sum()

    tiny = decode_batch({k: v[2:] for k, v in batch.items()}, 32, seed=0, max_pixels=100)
    width, height = Image.open(real).size
    assert tiny["error"][0] == f"{real}: image too large: {width}x{height} pixels, over 100"
    tried += 1
    messages += 1
    assert (tried, exactly, messages) == (4, 1, 3)


def _finished_out(root: Path) -> Path:
    """An OUT as a finished search leaves it for the report: trials.csv and metrics.json."""
    from test_dashboard import _metrics

    root.mkdir()
    pd.DataFrame([{"trial_id": f"t{i}", "family": "logistic", "features": "resnet50",
                   "params": "{}", "val_accuracy": 0.5 + i / 10, "status": "done"}
                  for i in range(2)]).to_csv(root / "trials.csv", index=False)
    (root / "metrics.json").write_text(json.dumps(_metrics("t1")))
    return root


def _drop(key):
    def edit(path: Path) -> None:
        body = json.loads(path.read_text())
        body.pop(key)
        path.write_text(json.dumps(body))
    return edit


# (file in OUT, damage) -> the message must name the file and say what to do
REPORT_PROBES = [
    ("metrics.json", lambda p: p.write_text('{"family": "logistic", "tri')),  # cut short
    ("metrics.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage")),
    ("metrics.json", lambda p: p.write_text("[1, 2, 3]")),
    ("metrics.json", lambda p: p.write_text("")),
    ("metrics.json", _drop("test")),
    ("metrics.json", _drop("trial_id")),
    ("metrics.json", lambda p: p.write_text(p.read_text().replace('"per_class": {',
                                                                   '"per_class": [{')
                                            .replace('}}, "confusion', '}]}, "confusion'))),
    ("trials.csv", lambda p: p.write_text("")),
    ("trials.csv", lambda p: p.write_bytes(bytes(range(256)) * 8)),
    ("trials.csv", lambda p: p.write_text("trial_id,family\nt1,logistic\n")),
    ("trials.csv", lambda p: p.write_text("trial_id,family,features,val_accuracy\n")),
]


def test_damaged_report_inputs_are_one_message(tmp_path, capsys):
    """`dermray report` on an OUT whose records are damaged: exit 2, one error line naming the
    file and the fix, no traceback; the undamaged OUT gives the page."""
    reference = _finished_out(tmp_path / "ref")
    assert main(["report", str(reference)]) == 0
    capsys.readouterr()
    tried = messages = 0
    for i, (name, damage) in enumerate(REPORT_PROBES):
        out = shutil.copytree(reference, tmp_path / f"o{i}")
        (out / "report.html").unlink()
        damage(out / name)
        tried += 1
        code = main(["report", str(out)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert f"{out / name} is damaged" in lines[0] and "--fresh" in lines[0], lines[0]
        assert not (out / "report.html").exists()
        messages += 1
    assert (tried, messages) == (len(REPORT_PROBES), 11)


def test_a_damaged_fingerprint_or_manifest_record_is_one_message(synth_manifest, tmp_path,
                                                                monkeypatch):
    """The stage records the reruns read back (a fingerprint, the manifest's own record):
    damaged, they are a message naming the file and --fresh."""
    from dermray.config import SearchConfig
    from dermray.io.fingerprint import FILE
    from dermray.stages import search

    out = tmp_path / "out"
    cfg = SearchConfig(out=str(out), families=("logistic",), features=("resnet50",))
    folder = Path(search.experiment_path(cfg))
    folder.mkdir(parents=True)
    (folder / FILE).write_text('{"key": ')
    with pytest.raises(DermrayError, match=f"{folder / FILE} is damaged .*pass --fresh"):
        search.run_search(cfg, str(synth_manifest))
    # and --fresh starts it over (the damaged record deleted with the folder), as it says
    monkeypatch.setattr(search, "ensure_ray", lambda: None)
    monkeypatch.setattr(search, "check_trial_resources", lambda cfg: None)
    class Reached(Exception):
        pass

    def reached(*a):
        raise Reached

    monkeypatch.setattr(search, "load_search_data", reached)
    with pytest.raises(Reached):
        search.run_search(cfg, str(synth_manifest), fresh=True)
    assert json.loads((folder / FILE).read_text())["stage"] == "search"
    emb = out / "embeddings" / "backbone=resnet50"
    emb.mkdir(parents=True)
    (emb / FILE).write_text("[]")
    with pytest.raises(DermrayError, match=f"{emb / FILE} is damaged .*not a dict"):
        search.search_fingerprint(cfg, str(synth_manifest))

    import pyarrow.parquet as pq

    from dermray.data.catalog import manifest_meta

    table = pq.read_table(synth_manifest)
    for record in (b"{cut short", b"[]"):
        damaged = tmp_path / "manifest.parquet"
        pq.write_table(table.replace_schema_metadata({b"dermray": record}), damaged)
        with pytest.raises(CatalogError, match=f"The manifest {damaged} is damaged .*--fresh"):
            manifest_meta(str(damaged))


def test_a_run_refuses_a_changed_search_before_extraction_starts_ray(synth_dir, tmp_path,
                                                                      monkeypatch):
    """`dermray run` with extraction still to do: a changed search setting is refused before
    the extraction starts Ray (30 s) or writes anything; the same config (the reference) goes
    on to the extraction's Ray job."""
    from dermray.io.fingerprint import StaleOutputError
    from dermray.stages import extract, pipeline, search

    class RayStarted(Exception):
        pass

    def ray_started():
        raise RayStarted

    monkeypatch.setattr(extract, "ensure_ray", ray_started)
    monkeypatch.setattr(search, "ensure_ray", ray_started)
    out = tmp_path / "out"
    text = (f"data:\n  metadata: {synth_dir / 'HAM10000_metadata.csv'}\n  images: [{synth_dir}]\n"
            "extract:\n  backbones: [resnet50]\n  weights: {resnet50: none}\n  image_size: 32\n"
            "search:\n  families: [logistic]\n  features: [resnet50]\n  seed: SEED\n")
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(text.replace("SEED", "0"))
    second.write_text(text.replace("SEED", "1"))
    with pytest.raises(RayStarted):  # the first run: every claim made, extraction pending
        pipeline.run_pipeline(str(first), str(out))
    # the experiment claimed as the first run's search will claim it, once extraction ran
    extracting = extract.check_outputs(pipeline.load_section(
        "extract", str(first), {"manifest": str(out / "manifest.parquet"), "out": str(out)}))
    cfg = pipeline.load_section("search", str(first), {"out": str(out)})
    search.claim(search.experiment_path(cfg), "search",
                 search.search_fingerprint(cfg, str(out / "manifest.parquet"), extracting),
                 root=search.storage_path(cfg))
    before = sorted(out.rglob("*"))
    with pytest.raises(StaleOutputError, match="settings.seed: 0 -> 1"):
        pipeline.run_pipeline(str(second), str(out))
    assert sorted(out.rglob("*")) == before
    with pytest.raises(RayStarted):  # the same settings: on to the extraction's job
        pipeline.run_pipeline(str(first), str(out))
