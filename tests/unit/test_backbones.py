import numpy as np
import pytest

from dermray.models.backbones import (
    BACKBONES,
    BackboneError,
    build_extractor,
    caffe_preprocess,
    get_spec,
    resolve_weights,
    weights_identity,
)


def test_caffe_preprocessing_equals_keras():
    import keras

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
    ours = caffe_preprocess(img.astype(np.uint8))
    for app in (keras.applications.resnet50, keras.applications.vgg19):
        ref = np.asarray(app.preprocess_input(img.copy()))
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(BackboneError, match="Known backbones: resnet50, resnet50_c4b6, resnet50_c5b2, resnet50_ms, "
                                            "vgg19"):
        get_spec("vgg16")


def test_weights_resolution(tmp_path):
    assert resolve_weights("none") is None and resolve_weights("imagenet") == "imagenet"
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_weights(str(tmp_path / "w.h5"))
    assert weights_identity("none") == "none"
    f = tmp_path / "w.h5"
    f.write_bytes(b"abc")
    assert weights_identity(str(f)).startswith("sha256:ba7816bf")


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    bad = tmp_path / "not_weights.h5"
    bad.write_text("this is not an HDF5 file")
    with pytest.raises(BackboneError, match="not_weights.h5"):
        build_extractor("vgg19", str(bad), 32)


def test_wrong_architecture_weights_name_the_file(resnet50_weights):
    with pytest.raises(BackboneError, match=resnet50_weights.name):
        build_extractor("vgg19", str(resnet50_weights), 32)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_feature_sizes_and_frozen(name):
    model = build_extractor(name, None, 32)
    out = np.asarray(model(np.zeros((2, 32, 32, 3), np.float32), training=False))
    assert out.shape == (2, get_spec(name).dim(32))
    assert not model.trainable and model.trainable_weights == []


def test_frozen_extractor_embeds_one_batch_without_ray():
    from dermray.models.backbones import FrozenExtractor

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    none = {"resnet50": "none", "resnet50_ms": "none"}
    extractor = FrozenExtractor(["resnet50", "resnet50_ms"], none, 32, batch_size=4,
                                jit_compile=False)
    assert [names for names, _ in extractor.networks] == [["resnet50_ms"]]  # resnet50: a slice
    need = np.array([True, False, True, True, False])
    out = extractor.embed_rows(images, {"resnet50": need, "resnet50_ms": np.zeros(5, bool)})
    assert out["resnet50"].shape == (5, 2048) and out["resnet50_ms"].shape == (5, 3840)
    assert not out["resnet50"][~need].any() and out["resnet50"][need].any()
    np.testing.assert_array_equal(out["resnet50"][need], out["resnet50_ms"][need][:, 1792:])
    np.testing.assert_allclose(extractor.embed("resnet50", images[need]), out["resnet50"][need],
                               rtol=1e-5, atol=1e-5)


def test_activation_map_comes_from_the_same_forward_pass():
    """resnet50_c5b2 and resnet50_c4b6 (the conv5_block2_out and conv4_block6_out maps,
    flattened) are outputs of the one ResNet50 that also gives resnet50_ms: one network, and the
    same values as a model of each layer alone."""
    import keras

    from dermray.models.backbones import FrozenExtractor, preprocess

    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    names = ["resnet50_ms", "resnet50_c5b2", "resnet50_c4b6"]
    extractor = FrozenExtractor(names, dict.fromkeys(names, "none"), 64, batch_size=2,
                                jit_compile=False)
    assert [n for n, _ in extractor.networks] == [names]
    assert get_spec("resnet50_c5b2").map_shape(224) == (7, 7, 2048)
    assert get_spec("resnet50_c5b2").map_shape(64) == (2, 2, 2048)
    assert get_spec("resnet50_c4b6").map_shape(224) == (14, 14, 1024)
    assert get_spec("resnet50_c4b6").map_shape(64) == (4, 4, 1024)
    assert get_spec("resnet50_c4b6").dim(224) == 200_704  # values per view: 401,408 B as float16
    every = np.ones(3, bool)
    out = extractor.embed_rows(images, dict.fromkeys(names, every))
    assert out["resnet50_c5b2"].shape == (3, 2 * 2 * 2048)
    assert out["resnet50_c4b6"].shape == (3, 4 * 4 * 1024)
    keras.utils.set_random_seed(0)  # the extractor's seed: the same random weights
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    for name, layer in (("resnet50_c5b2", "conv5_block2_out"), ("resnet50_c4b6", "conv4_block6_out")):
        alone = keras.Model(base.input, base.get_layer(layer).output)
        ref = np.asarray(alone(preprocess("resnet50", images), training=False)).reshape(3, -1)
        np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-4)


def test_mixed_precision_keeps_the_maps_float16_and_the_vectors_float32():
    """Under mixed precision (the cluster config's) the network gives float16. An activation map
    stays float16, as it is written (no round trip through float32: two casts of every value in
    a GPU node's actor, issue 21); the vectors are float32; the values are the network's own,
    bit for bit, padding and slicing included. ``embed`` still returns float32."""
    import keras

    from dermray.models.backbones import FrozenExtractor

    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    names = ["resnet50", "resnet50_ms", "resnet50_c5b2"]
    try:
        extractor = FrozenExtractor(names, dict.fromkeys(names, "none"), 32, batch_size=2,
                                    jit_compile=False, mixed_precision=True)
        out = extractor.embed_rows(images, dict.fromkeys(names, np.ones(3, bool)))
        ((computed, forward),) = extractor.networks
        raw = [forward(images[:2]), forward(np.concatenate([images[2:], images[:1]]))]
        alone = extractor.embed("resnet50_c5b2", images)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert computed == ["resnet50_ms", "resnet50_c5b2"]  # resnet50 is a slice of resnet50_ms
    ms, the_map = (np.concatenate([raw[0][k], raw[1][k][:1]]) for k in range(2))
    assert ms.dtype == the_map.dtype == np.float16  # what the network hands over
    assert out["resnet50_c5b2"].dtype == np.float16
    assert np.array_equal(out["resnet50_c5b2"].view(np.uint16), the_map.view(np.uint16))
    assert out["resnet50_ms"].dtype == out["resnet50"].dtype == np.float32
    assert np.array_equal(out["resnet50_ms"], ms.astype(np.float32))
    assert np.array_equal(out["resnet50"], out["resnet50_ms"][:, 1792:])
    assert alone.dtype == np.float32 and np.array_equal(alone, the_map.astype(np.float32))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_preprocessing_inside_the_compiled_call_gives_the_same_bits(jit_compile):
    """Issue 21: the extractor's compiled call takes the uint8 images and does the caffe
    preprocessing in its graph. Its embeddings and maps are bit for bit the NumPy path's (the
    preprocessing in NumPy, then the network's own compiled call), with and without XLA."""
    from dermray.models.backbones import FrozenExtractor, compile_forward

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    names = ["resnet50_ms", "resnet50_c5b2"]
    extractor = FrozenExtractor(names, dict.fromkeys(names, "none"), 32, batch_size=4,
                                jit_compile=jit_compile)
    every = np.ones(len(images), bool)
    inside = extractor.embed_rows(images, dict.fromkeys(names, every))
    model = build_network_for_test(names)
    numpy_path = compile_forward(model, jit_compile=jit_compile)
    before = [np.concatenate(parts) for parts in zip(
        numpy_path(caffe_preprocess(images[:4])),
        numpy_path(caffe_preprocess(np.concatenate([images[4:], np.zeros((3, 32, 32, 3),
                                                                          np.uint8)]))))]
    np.testing.assert_array_equal(inside["resnet50_ms"], before[0][:5])
    np.testing.assert_array_equal(inside["resnet50_c5b2"], before[1][:5])
    # a mode no table knows is refused by name; images already preprocessed are refused
    with pytest.raises(BackboneError, match="No preprocessing 'torch'"):
        compile_forward(model, preprocessing="torch")
    with pytest.raises(BackboneError, match="takes uint8 RGB images"):
        extractor.embed_rows(caffe_preprocess(images), dict.fromkeys(names, every))


def build_network_for_test(names):
    """The extractor's own network: random weights, seeded as the extractor seeds them."""
    import keras

    from dermray.models.backbones import build_network

    keras.utils.set_random_seed(0)
    return build_network(names, "none", 32)
