"""Shared fixtures: the synthetic dataset, the real data in ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep TensorFlow quiet and on the CPU in tests
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMRAY_SHARED", REPO.parent / "shared"))
HAM = SHARED / "data" / "ham10000"
WEIGHTS = SHARED / "weights"
RESNET50_WEIGHTS = WEIGHTS / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


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
    from dermray.synth import write_synth_dataset

    dest = tmp_path_factory.mktemp("synth")
    write_synth_dataset(dest, n=140, seed=0, size=(64, 48))
    return dest


@pytest.fixture(scope="session")
def synth_manifest(synth_dir, tmp_path_factory) -> Path:
    """The split of the synthetic dataset: OUT/manifest.parquet."""
    from dermray.config import DataConfig
    from dermray.pipeline import run_split

    out = tmp_path_factory.mktemp("synth_out")
    cfg = DataConfig(metadata=str(synth_dir / "HAM10000_metadata.csv"), images=(str(synth_dir),),
                     out=str(out), seed=0)
    path, _ = run_split(cfg)
    return Path(path)
