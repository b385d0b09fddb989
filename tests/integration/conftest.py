"""A local Ray started once per session (num_cpus=2), with the actor crash point armed once."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermray.config import DataConfig, ExtractConfig
from dermray.io import faults
from dermray.stages.extract import run_extract
from dermray.stages.pipeline import run_split

# resnet50_c5b2: the activation map the cached fine-tune trains on (an output of resnet50's pass)
BACKBONES = ("resnet50", "vgg19", "resnet50_c5b2")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")

    # the first Embedder batch of the session kills its actor once (crash point "embed"): every
    # extraction test then also checks that Ray's restart + retry still gives exactly the
    # planned rows
    marker = tmp_path_factory.mktemp("fault") / "killed"
    os.environ.update({faults.ENV: "embed", faults.ONCE_ENV: str(marker)})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    for name in (faults.ENV, faults.ONCE_ENV):
        os.environ.pop(name, None)


def _damage(dataset: Path) -> dict[str, str]:
    """Break some images and give others odd modes; returns image_id -> what was done."""
    files = sorted(dataset.glob("HAM10000_images_part_*/*.jpg"))
    done = {}
    files[0].write_bytes(np.random.default_rng(0).bytes(500))
    done[files[0].stem] = "corrupt"
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    done[files[1].stem] = "truncated"
    files[2].write_text("lesion_id,image_id,dx\n")
    done[files[2].stem] = "text"
    Image.open(files[3]).convert("L").save(files[3], "JPEG")
    done[files[3].stem] = "gray"
    Image.open(files[4]).convert("CMYK").save(files[4], "JPEG")
    done[files[4].stem] = "cmyk"
    arr = np.asarray(Image.open(files[5]).convert("L")).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    files[5].write_bytes(buf.getvalue())
    done[files[5].stem] = "16-bit"
    Image.open(files[6]).convert("RGBA").save(buf := io.BytesIO(), "PNG")
    files[6].write_bytes(buf.getvalue())
    done[files[6].stem] = "rgba"
    return done


@pytest.fixture(scope="session")
def extracted(ray_local, synth_dir, tmp_path_factory):
    dataset = tmp_path_factory.mktemp("damaged")
    shutil.copytree(synth_dir, dataset, dirs_exist_ok=True)
    damage = _damage(dataset)
    out = tmp_path_factory.mktemp("extract_out")
    run_split(DataConfig(metadata=str(dataset / "HAM10000_metadata.csv"), out=str(out), seed=0))
    cfg = ExtractConfig(manifest=str(out / "manifest.parquet"), out=str(out), backbones=BACKBONES,
                        weights={b: "none" for b in BACKBONES}, image_size=32, batch_size=16,
                        augment=True, max_views_per_image=2, tta_views=1, jit_compile=False)
    record = run_extract(cfg)
    return out, cfg, record, damage, ray_local




SEARCH = {"families": ["logistic", "xgboost", "mlp", "finetune", "cached_cnn"],
          "features": ["resnet50", "vgg19+meta"], "num_samples": 5, "max_concurrent": 2,
          "grace_period": 2, "mlp_max_epochs": 8, "xgb_max_estimators": 30,
          "finetune_weights": {"resnet50": "none"}, "finetune_image_size": 32,
          "finetune_epochs": 1, "finetune_max_train_images": 48, "cached_cnn_epochs": 1,
          # the session's tests reproduce a single trial's figures from its bundle; the
          # ensemble candidate has its own tests (tests/unit/test_ensemble.py)
          "ensemble": False}


@pytest.fixture(scope="session")
def searched(extracted, tmp_path_factory):
    out, *_ = extracted
    config = tmp_path_factory.mktemp("cfg") / "search.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"search": SEARCH}))
    from dermray.stages.pipeline import run_search_stage

    summary = run_search_stage(str(config), str(out), str(out / "manifest.parquet"))
    return out, summary


