"""benchmarks/extract_paired.py: each job is compared with the two direct calls measured beside it
(before and after), not with one timing taken minutes away; and the direct call it times is the
job's own compiled call, over whole batches of real decoded views."""

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def load_paired():
    spec = importlib.util.spec_from_file_location("extract_paired",
                                                  REPO / "benchmarks" / "extract_paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_job_is_compared_with_the_direct_calls_beside_it():
    paired = load_paired()
    directs = [{"views_s": 20.0}, {"views_s": 25.0}, {"views_s": 15.0}]
    jobs = [{"stage_views_s": 18.0, "from_nothing_views_s": 18.0 * 0.9},
            {"stage_views_s": 16.0, "from_nothing_views_s": 16.0 * 0.9}]
    result = paired.compare(jobs, directs)
    first, second = result["jobs"]
    assert first["direct_beside_views_s"] == [20.0, 25.0]
    assert first["ratio_stage"] == pytest.approx(18.0 / 22.5)
    assert first["ratio_stage_range"] == pytest.approx([18.0 / 25.0, 18.0 / 20.0])
    assert first["ratio_from_nothing"] == pytest.approx(0.9 * 18.0 / 22.5)
    assert second["direct_beside_views_s"] == [25.0, 15.0]  # not the first direct call
    assert second["ratio_stage"] == pytest.approx(16.0 / 20.0)
    assert result["ratio_stage_mean"] == pytest.approx((18.0 / 22.5 + 16.0 / 20.0) / 2)
    assert "ratio_stage" not in jobs[0]  # the caller's records are left as they were
    with pytest.raises(ValueError, match="2 jobs need 3 direct calls"):
        paired.compare(jobs, directs[:2])


def test_the_direct_call_runs_the_jobs_network_over_whole_batches(synth_dir, tmp_path,
                                                                  monkeypatch):
    paired = load_paired()
    monkeypatch.chdir(tmp_path)  # the benchmark moves to the repository (relative paths)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"metadata": str(synth_dir / "HAM10000_metadata.csv"), "images": [str(synth_dir)]},
        "extract": {"backbones": ["resnet50", "resnet50_ms"], "weights": {"resnet50": "none",
                                                                        "resnet50_ms": "none"},
                    "image_size": 32, "batch_size": 4, "augment": False,
                    "jit_compile": False}}))  # no XLA compile: seconds off the suite
    result = paired.direct_call(str(config), views=10, segment=2, sample_views=8)
    assert result["views"] == 12  # 10 views: three whole batches of 4
    assert result["batch_size"] == 4
    assert result["backbones"] == ["resnet50", "resnet50_ms"]  # one network, one pass
    assert [s["at_s"] for s in result["segments"]] == sorted(s["at_s"] for s in result["segments"])
    assert len(result["segments"]) == 2  # batches 1-2, then the last one
    assert result["views_s"] > 0 and result["first_call_s"] > 0
