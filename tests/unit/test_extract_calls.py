"""An embedding actor that runs two Ray Data calls at once (``extract.calls_per_actor``) still
puts one batch at a time through the network; the calls' decode and writing overlap it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dermray.config import ExtractConfig
from dermray.errors import DermrayError
from dermray.stages.extract import Embedder


class SlowExtractor:
    """Stands in for ``FrozenExtractor``: records how many batches are inside it at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.calls = 0
        self.guard = threading.Lock()

    def embed_rows(self, images, needed):
        with self.guard:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.calls += 1
        time.sleep(0.05)  # the network's pass: long enough for another call to arrive
        with self.guard:
            self.inside -= 1
        return {name: images.reshape(len(images), -1)[:, :2].astype(np.float32)
                for name in needed}


def embedder(extractor) -> Embedder:
    actor = Embedder.__new__(Embedder)  # no TensorFlow: the actor around a stand-in network
    actor.extractor, actor.backbones, actor.out = extractor, ["resnet50"], None
    actor.where = {"actor_id": "a", "node_id": "n", "gpu_ids": ""}
    actor.network = threading.Lock()
    return actor


def batch(i: int) -> dict[str, np.ndarray]:
    return {"image": np.full((4, 2, 2, 3), i, np.uint8),
            "image_id": np.asarray([f"ISIC_{i}_{j}" for j in range(4)], object),
            "error": np.asarray([""] * 4, object)}


def test_concurrent_calls_put_one_batch_at_a_time_through_the_network():
    extractor = SlowExtractor()
    actor = embedder(extractor)
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, actor(batch(i))))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(6))  # a call that raised would be missing here
    assert extractor.calls == 6 and extractor.most == 1
    for i, out in results.items():  # each call got its own batch's rows back
        assert list(out["image_id"]) == [f"ISIC_{i}_{j}" for j in range(4)]
        assert (out["emb_resnet50"] == i).all()


def test_without_the_lock_the_stand_in_would_see_two_batches():
    """The check above can fail: the same calls with the lock taken away overlap."""
    extractor = SlowExtractor()
    actor = embedder(extractor)
    actor.network = type("NoLock", (), {"__enter__": lambda s: s,
                                        "__exit__": lambda s, *a: None})()
    threads = [threading.Thread(target=actor, args=(batch(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert extractor.most > 1


def test_calls_per_actor_is_at_least_one():
    with pytest.raises(DermrayError, match="calls_per_actor"):
        ExtractConfig(calls_per_actor=0)
    assert ExtractConfig().calls_per_actor == 2


def test_jit_compile_auto_picks_xla_per_network():
    """``extract.jit_compile: auto`` (the default): XLA for every network on a GPU, on CPU only
    where it measured faster (ResNet50 yes, VGG19 no); true and false force it either way."""
    from dermray.config import build_section
    from dermray.models.backbones import BackboneError, FrozenExtractor, use_xla

    assert ExtractConfig().jit_compile == "auto"
    # YAML's booleans and Python's are the same choice; anything else names the key
    for value, expected in ((True, "true"), ("false", "false"), ("AUTO", "auto")):
        assert build_section("extract", {"jit_compile": value}).jit_compile == expected
    assert ExtractConfig(jit_compile=False).jit_compile == "false"
    with pytest.raises(DermrayError, match="extract.jit_compile.*auto, true, false"):
        build_section("extract", {"jit_compile": "sometimes"})

    assert use_xla("auto", "ResNet50", []) is True
    assert use_xla("auto", "VGG19", []) is False
    assert use_xla("auto", "VGG19", ["/physical_device:GPU:0"]) is True
    assert use_xla("true", "VGG19", []) is True and use_xla(False, "ResNet50", []) is False
    with pytest.raises(BackboneError, match="jit_compile must be one of auto, true, false"):
        use_xla("yes please", "VGG19", [])
    # one extractor holding both networks compiles each its own way (32 px, random weights)
    both = FrozenExtractor(["vgg19", "resnet50"], {"vgg19": "none", "resnet50": "none"}, 32,
                           batch_size=2, jit_compile="auto")
    assert both.xla == {"VGG19": False, "ResNet50": True}
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = both.embed_rows(images, {"vgg19": np.ones(3, bool), "resnet50": np.ones(3, bool)})
    assert out["vgg19"].shape == (3, 512) and out["resnet50"].shape == (3, 2048)
    assert np.isfinite(out["vgg19"]).all() and np.isfinite(out["resnet50"]).all()
