"""benchmarks/gpu_node.py: what a GPU node needs to feed its GPU, on a tiny synthetic pack.

The pack holds whole decode batches of the plan, one image file per image and an original for
each, and one batch's outputs of the node config's networks; the CPU side decodes and writes
every view it counts (files reconcile); the GPU side times the actor's own call; the report is
the arithmetic of the two. No timing assertions."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def load_gpu_node():
    # importable by name: the CPU side's worker processes (spawned) find their function there
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("gpu_node")


@pytest.fixture(scope="module")
def packed(synth_dir, tmp_path_factory):
    gpu_node = load_gpu_node()
    tmp = tmp_path_factory.mktemp("gpu_node")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"metadata": str(synth_dir / "HAM10000_metadata.csv"), "images": [str(synth_dir)]},
        "extract": {"backbones": ["resnet50", "resnet50_ms", "resnet50_c5b2"],
                    "weights": {"resnet50": "none", "resnet50_ms": "none",
                                "resnet50_c5b2": "none"},
                    "image_size": 32, "batch_size": 8, "decode_batch_size": 4,
                    "augment": True, "max_views_per_image": 2, "jit_compile": False}}))
    dest = tmp / "pack"
    meta = gpu_node.pack(str(dest), 16, str(config), str(config),
                         str(synth_dir / "HAM10000_images_part_1"), weights_dir=None)
    return gpu_node, dest, meta


def test_the_pack_is_whole_decode_batches_with_their_files_and_outputs(packed):
    _, dest, meta = packed
    plan = pd.read_parquet(dest / "plan.parquet")
    assert len(plan) == meta["views"] == 16
    assert meta["decode_batch_size"] == 4 and meta["batch_size"] == 8
    # every view's image and original travel with the pack, under relative names
    for column in ("path", "path_original"):
        assert all((dest / p).is_file() for p in plan[column])
        assert not any(Path(p).is_absolute() for p in plan[column])
    # one original per image, the same for all its views
    assert (plan.groupby("image_id")["path_original"].nunique() == 1).all()
    # four blocks of four at even steps through the plan (sorted by split): every split
    assert meta["plan_views"] > 16
    assert set(plan["split"]) == {"train", "val", "test"}
    saved = np.load(dest / "outputs.npz")
    assert sorted(saved.files) == sorted(json.loads((dest / "meta.json").read_text())["backbones"])
    assert saved["resnet50_c5b2"].dtype == np.float16  # a map is written as float16
    assert saved["resnet50_ms"].shape == (4, 3840)  # one decode batch


def test_cpu_side_decodes_and_writes_every_view_it_counts(packed, tmp_path):
    gpu_node, dest, _ = packed
    result = gpu_node.cpu_side(str(dest), [1], 0, str(tmp_path / "cpu.json"))
    assert json.loads((tmp_path / "cpu.json").read_text())["runs"] == result["runs"]
    assert [r["images"] for r in result["runs"]] == ["200x150", "600x450"]
    for run in result["runs"]:
        assert run["views"] == 16  # the whole sample: two of the actor's batches
        assert run["files_written"] == run["files_expected"] > 0
        assert run["decode_augment_cpu_ms_per_view"] > 0 and run["write_cpu_ms_per_view"] > 0
        assert run["cpu_ms_per_view"] == pytest.approx(run["decode_augment_cpu_ms_per_view"]
                                                       + run["write_cpu_ms_per_view"])
    # more views than the sample, in two processes starting at different batches: the passes
    # over the sample write apart, so every file counted is a file written
    more = gpu_node.cpu_side(str(dest), [2], 40, str(tmp_path / "more.json"))
    for run in more["runs"]:
        assert run["views"] == 2 * 40  # 40 views each: five batches of 8, past the sample's 16
        assert run["files_written"] == run["files_expected"]


def test_gpu_side_times_the_actors_call_in_each_precision(packed, tmp_path):
    gpu_node, dest, _ = packed
    gpu = gpu_node.gpu_side(str(dest), [8], ["mixed_float16", "float32"], 0.0, ["resnet50"],
                            str(tmp_path / "gpu.json"))
    assert json.loads((tmp_path / "gpu.json").read_text())["runs"] == gpu["runs"]
    # each setting built under its own policy (Keras' clear_session resets it between builds)
    assert [r["policy"] for r in gpu["runs"]] == ["mixed_float16", "float32"]
    for run in gpu["runs"]:
        assert run["backbones"] == ["resnet50", "resnet50_ms", "resnet50_c5b2"]
        assert run["views"] == 5 * 8  # at least five calls of a whole batch
        # the outputs as the actor holds them: two float32 vectors and the 1x1x2048 map, in
        # float16 under mixed precision (the network's own dtype), else float32
        map_bytes = (2 if run["policy"] == "mixed_float16" else 4) * 1 * 1 * 2048
        assert run["host_output_bytes_per_view"] == 4 * (2048 + 3840) + map_bytes
        assert run["host_preprocess_cpu_ms_per_view"] == 0.0  # TensorFlow: in the graph


def test_the_report_is_the_arithmetic_of_the_two_sides():
    gpu_node = load_gpu_node()
    cpu = {"cpus": 16, "runs": [
        {"images": "200x150", "processes": 16, "decode_augment_cpu_ms_per_view": 2.0,
         "write_cpu_ms_per_view": 6.0},
        {"images": "600x450", "processes": 16, "decode_augment_cpu_ms_per_view": 4.0,
         "write_cpu_ms_per_view": 6.0},
        {"images": "600x450", "processes": 16, "decode_augment_cpu_ms_per_view": 6.0,
         "write_cpu_ms_per_view": 8.0},  # a repeat: averaged
        {"images": "600x450", "processes": 1, "decode_augment_cpu_ms_per_view": 3.0,
         "write_cpu_ms_per_view": 5.0}]}  # not at full load: left out
    gpu = {"meta": {"batch_size": 8, "mixed_precision": True},
           "runs": [{"network": "both", "batch_size": 8, "precision": "mixed_float16",
                     "views_s": 500.0, "process_cpu_ms_per_view": 3.0,
                     "host_preprocess_cpu_ms_per_view": 1.0},
                    {"network": "both", "batch_size": 8, "precision": "float32",
                     "views_s": 100.0, "process_cpu_ms_per_view": 9.0}]}
    answer = gpu_node.report(cpu, gpu)  # the config's batch and precision
    assert answer["gpu_views_s"] == 500.0 and answer["precision"] == "mixed_float16"
    assert answer["processes"] == 16 and answer["all_vcpus_busy"]
    assert answer["actor_call_cpu_ms_per_view"] == pytest.approx(3.0 - 1.0)
    big, small = answer["by_images"]["600x450"], answer["by_images"]["200x150"]
    assert big["runs_averaged"] == 2 and small["runs_averaged"] == 1
    assert big["decode_augment_vcpus"] == pytest.approx(500 * 5.0 / 1000)
    assert big["actor_vcpus"] == pytest.approx(500 * (2.0 + 7.0) / 1000)
    assert big["vcpus_per_gpu"] == pytest.approx(2.5 + 4.5)
    assert big["write_share_of_actor"] == pytest.approx(7.0 / 9.0)
    assert small["vcpus_per_gpu"] == pytest.approx(500 * (2.0 + 2.0 + 6.0) / 1000)
    assert not gpu_node.report(dict(cpu, cpus=32), gpu)["all_vcpus_busy"]
    with pytest.raises(SystemExit, match="No GPU run of vgg19"):
        gpu_node.report(cpu, gpu, network="vgg19")


def test_encode_side_reports_each_output_and_the_threads(packed):
    gpu_node, dest, meta = packed
    result = gpu_node.encode_side(str(dest), 1, [1, 2])
    assert sorted(result["outputs"]) == sorted(meta["backbones"])
    assert result["rows"] == meta["decode_batch_size"]  # the pack's one batch of real outputs
    the_map = result["outputs"]["resnet50_c5b2"]
    assert the_map["values_per_view"] == 2048  # 1x1x2048 at 32 px
    assert "to_table_from_float16_ms_per_view" in the_map  # as a mixed-precision network gives it
    assert "to_table_from_float16_ms_per_view" not in result["outputs"]["resnet50_ms"]
    # uncompressed, a float16 map is at least its 2 bytes a value, a float32 vector its 4
    assert the_map["uncompressed_kb_per_view"] * 1000 >= 2 * 2048
    assert result["outputs"]["resnet50_ms"]["uncompressed_kb_per_view"] * 1000 >= 4 * 3840
    assert result["threads"]["output"] == "resnet50_ms"  # the most values a view
    assert sorted(result["threads"]["mean_views_s"]) == ["1", "2"]
