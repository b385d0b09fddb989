"""Registry of frozen feature extractors: name -> builder, preprocessing, input size, feature size.

The model code is plain Keras 3 (``keras.applications``), so it runs on any Keras backend;
only device set-up and the compiled forward call look at the backend.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermray.errors import DermrayError, lookup

logger = logging.getLogger(__name__)

# ImageNet channel means in BGR order, as keras.applications' "caffe" mode subtracts them
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

# the input side: ImageNet's, the default of every stage; the smallest a network with five
# stride-2 steps still maps to one cell, the largest a decode is asked for
IMAGE_SIZE = 224
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
IMAGE_SIZE_RULE = f"an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"


def valid_image_size(value: object) -> bool:
    """Whether ``value`` is an input side the backbones take (``IMAGE_SIZE_RULE``)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE)


class BackboneError(DermrayError):
    """An unknown backbone, or weights that cannot be loaded into it."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a frozen extractor is: how to build it, how to feed it, what it returns."""

    name: str
    application: str  # the keras.applications constructor
    feature_dim: int
    preprocessing: str = "caffe"  # a key of PREPROCESSING; recorded in a bundle per backbone
    default_size: int = IMAGE_SIZE
    # globally pooled outputs of these layers, concatenated (None: the last block, avg-pooled)
    stages: tuple[str, ...] | None = None
    gflops_224: float = 0.0  # forward GFLOP per 224x224 image (for efficiency figures)
    # (other backbone, start, stop): this backbone's features are a column slice of that one's,
    # so an actor holding both computes the network once
    slice_of: tuple[str, int, int] | None = None
    # Keras' ImageNet "notop" weights file (its name is the URL's last segment) and Keras' md5
    # (the hash keras.applications pins: a file with it is Keras' own, which may be downloaded)
    imagenet_url: str = ""
    imagenet_md5: str = ""
    # an activation map instead of a pooled vector: the unpooled output of this layer (the
    # input of the layers a cached fine-tune trains), stored flattened as float16 under
    # OUT/activations; its size depends on the input size (``dim``)
    layer: str = ""
    channels: int = 0
    stride: int = 32  # the layer's total stride: the map is ceil(size / stride) square
    # ``jit_compile: auto`` on a machine without GPUs: whether XLA makes this network's call
    # faster on CPU (on a GPU it is compiled with XLA either way). Measured on this project's
    # 2-core development VM at 224, batch 32 (benchmarks/extract_throughput.py, 2026-12-03):
    # ResNet50 19.90 img/s with XLA against 16.87 without; VGG19 3.39 with against 5.53 without
    xla_on_cpu: bool = True

    @property
    def is_map(self) -> bool:
        return bool(self.layer)

    def map_shape(self, image_size: int) -> tuple[int, int, int]:
        """(height, width, channels) of an activation map at ``image_size`` (each stride-2 step of
        ResNet rounds up)."""
        side = image_size
        for _ in range(self.stride.bit_length() - 1):
            side = -(-side // 2)
        return side, side, self.channels

    def dim(self, image_size: int = IMAGE_SIZE) -> int:
        """Values per view: the feature size, or the flattened map's size at ``image_size``."""
        return int(np.prod(self.map_shape(image_size))) if self.is_map else self.feature_dim


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
RESNET50_IMAGENET = {"imagenet_url": KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     "imagenet_md5": "4d473c1dd8becc155b73f8504c6f6626"}
register_backbone(BackboneSpec(
    "vgg19", "VGG19", 512, gflops_224=39.3, xla_on_cpu=False,
    imagenet_url=KERAS_WEIGHTS + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    imagenet_md5="253f8cb515780f3b799900260a226db6"))
register_backbone(BackboneSpec("resnet50", "ResNet50", 2048, gflops_224=8.2,
                               slice_of=("resnet50_ms", 1792, 3840), **RESNET50_IMAGENET))
# multi-stage ResNet50: the pooled outputs of all four stages (256+512+1024+2048)
register_backbone(BackboneSpec(
    "resnet50_ms", "ResNet50", 3840, gflops_224=8.2,
    stages=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    **RESNET50_IMAGENET))
# ResNet50's activations at the input of its last residual block (7x7x2048 at 224): what the
# cached fine-tune family trains conv5_block3 and a classifier on (see dermray/models/heads/cached.py)
register_backbone(BackboneSpec(
    "resnet50_c5b2", "ResNet50", 0, gflops_224=8.2, layer="conv5_block2_out", channels=2048,
    **RESNET50_IMAGENET))
# the deeper cut: ResNet50's activations at the input of its last stage (14x14x1024 at 224, twice
# c5b2's storage per view), from which cached_cnn trains the whole of stage 5 (conv5_block1..3)
register_backbone(BackboneSpec(
    "resnet50_c4b6", "ResNet50", 0, gflops_224=8.2, layer="conv4_block6_out", channels=1024,
    stride=16, **RESNET50_IMAGENET))


# a layer every full weights file of the application holds (its last convolution): a file
# without it was saved from another network
SIGNATURE_LAYERS = {"ResNet50": "conv5_block3_3_conv", "VGG19": "block5_conv4"}


def weights_layer_problem(backbone: str, path: str | Path) -> str | None:
    """Why an HDF5 weights file cannot be the backbone's (None: it can), from its layer names
    alone, in milliseconds, so that the driver refuses it before any actor builds a model."""
    import h5py

    spec = get_spec(backbone)
    marker = SIGNATURE_LAYERS.get(spec.application)
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in f.attrs.get("layer_names", ())]
    if not marker or not names or marker in names:
        return None
    return (f"it holds no layer {marker!r}, so it is not {spec.application} weights (its layers "
            f"start {', '.join(names[:3])})")


def get_spec(name: str) -> BackboneSpec:
    return lookup(BACKBONES, name, "backbone", "backbones", BackboneError, sorted(BACKBONES))


def caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """keras.applications' "caffe" preprocessing: RGB->BGR, minus the ImageNet mean, 0-255 in."""
    x = np.asarray(images, dtype=np.float32)[..., ::-1]
    return x - CAFFE_MEAN_BGR


def caffe_preprocess_ops(images):
    """``caffe_preprocess`` as Keras ops, for a compiled graph: the same float32 operations
    (uint8 to float32, the channels reversed, the float32 mean subtracted), so the same bits."""
    import keras

    x = keras.ops.flip(keras.ops.cast(images, "float32"), axis=-1)
    return x - keras.ops.convert_to_tensor(CAFFE_MEAN_BGR)


# preprocessing modes by name: a backbone's spec names its mode, a bundle records it
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {"caffe": caffe_preprocess}
# the same modes as graph operations (``compile_forward``: inside the compiled call)
PREPROCESSING_OPS: dict[str, Callable[[Any], Any]] = {"caffe": caffe_preprocess_ops}


def preprocess(name: str, images: np.ndarray, mode: str | None = None) -> np.ndarray:
    """Uint8 RGB images (N, H, W, 3) as backbone ``name`` takes them: in ``mode`` (what a bundle
    recorded at export), else in the mode of the backbone's registry entry."""
    mode = mode or get_spec(name).preprocessing
    if mode not in PREPROCESSING:
        raise BackboneError(f"No preprocessing {mode!r} for {name}. Known modes: "
                            f"{', '.join(sorted(PREPROCESSING))}.")
    return PREPROCESSING[mode](images)


def resolve_weights(weights: str | None) -> str | None:
    """'imagenet' and None pass through; 'none' means None; a path must exist."""
    if weights is None or str(weights).lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"Weights file {weights} does not exist. Pass an existing .h5/.keras "
                            "file, 'imagenet' (downloads on a machine with internet) or 'none'.")
    return str(path)


WEIGHT_SUFFIXES = (".h5", ".keras")
_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}


def _digests(path: str | Path) -> tuple[str, str]:
    """('sha256:<hex>', md5 hex) of a file, in one read (remembered per path, size and mtime
    within a process)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
                md5.update(block)
        _DIGESTS[key] = (f"sha256:{sha.hexdigest()}", md5.hexdigest())
    return _DIGESTS[key]


def sha256_file(path: str | Path) -> str:
    """'sha256:<hex>' of a file (remembered per path, size and mtime within a process)."""
    return _digests(path)[0]


def imagenet_name(backbone: str) -> str:
    """The file name of the backbone's Keras ImageNet weights ('' if it has none)."""
    return get_spec(backbone).imagenet_url.rpartition("/")[2]


def imagenet_file(backbone: str) -> str:
    """Keras' ImageNet weights of a backbone, downloaded once into the Keras cache (Keras checks
    its md5); needs internet the first time."""
    import keras

    spec = get_spec(backbone)
    if not spec.imagenet_url:
        raise BackboneError(f"Backbone {backbone} has no ImageNet weights to download.")
    try:
        return keras.utils.get_file(imagenet_name(backbone), spec.imagenet_url,
                                    cache_subdir="models", file_hash=spec.imagenet_md5)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise BackboneError(
            f"Could not get the ImageNet weights of {backbone} ({spec.imagenet_url}): "
            f"{str(exc)[:200]}. Without internet, put {imagenet_name(backbone)} in a folder and "
            "pass its path as the weights (or that folder as --weights-dir).") from None


def weights_identity(weights: str | None, backbone: str | None = None) -> str:
    """What a run records: 'none' (seeded random weights) or 'sha256:<hex>' of the weights file.

    'imagenet' is hashed too when the backbone is given (downloading Keras' file if needed), so
    that a bundle finds the same file on another machine by content, not by path.
    """
    resolved = resolve_weights(weights)
    if resolved is None:
        return "none"
    if resolved == "imagenet":
        return sha256_file(imagenet_file(backbone)) if backbone else "imagenet"
    return sha256_file(resolved)


def weights_name(weights: str | None, backbone: str) -> str:
    """The file name a run used (a hint for finding it again; identity decides)."""
    resolved = resolve_weights(weights)
    if resolved is None:
        return ""
    return imagenet_name(backbone) if resolved == "imagenet" else Path(resolved).name


# where a backbone's weights come from, as a bundle records it: seeded random weights (a demo:
# meaningless on real images), Keras' own ImageNet file (the one keras.applications pins, which
# predict may download) or a file of the user's (found, never downloaded)
RANDOM, KERAS, FILE = "random", "keras", "file"
WEIGHTS_ORIGINS = (RANDOM, KERAS, FILE)


def weights_hint(weights: str | None, backbone: str) -> str:
    """The absolute path a run read its weights file at ('' for random weights): where predict
    looks first. A hint only: the file there is used only if its sha256 is the identity."""
    resolved = resolve_weights(weights)
    if resolved is None:
        return ""
    path = imagenet_file(backbone) if resolved == "imagenet" else resolved
    return os.path.abspath(os.path.expanduser(path))


def is_keras_file(backbone: str, path: str | Path) -> bool:
    """Whether a file is Keras' own ImageNet weights of the backbone (the md5 Keras pins)."""
    md5 = get_spec(backbone).imagenet_md5
    return bool(md5) and Path(path).is_file() and _digests(path)[1] == md5


def weights_origin(backbone: str, identity: str, path: str | Path = "") -> str:
    """RANDOM, KERAS or FILE for weights of ``identity`` read at ``path``."""
    if identity == "none":
        return RANDOM
    if identity == _keras_identity(backbone) or (
            path and is_keras_file(backbone, path) and sha256_file(path) == identity):
        return KERAS
    return FILE


def weights_search_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Where weights are looked for by identity: the folders given, $DERMRAY_WEIGHTS_DIR
    (os.pathsep-separated), then the Keras cache ($KERAS_HOME or ~/.keras, subfolder models)."""
    return [path for _, path in _weights_places(extra)]


def _weights_places(extra: Sequence[str | Path] = ()) -> list[tuple[str, Path]]:
    """(what the place is, the folder) of ``weights_search_dirs``, for messages."""
    env = [d for d in os.environ.get("DERMRAY_WEIGHTS_DIR", "").split(os.pathsep) if d]
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    return [*(("--weights-dir", Path(d).expanduser()) for d in extra),
            *(("$DERMRAY_WEIGHTS_DIR", Path(d).expanduser()) for d in env),
            ("the Keras cache", Path(keras_home, "models").expanduser())]


def _look_in(folder: Path, identity: str, name: str) -> tuple[str, str]:
    """(the file in ``folder`` whose sha256 is ``identity`` or '', why not found)."""
    if not folder.is_dir():
        return "", "no such folder"
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    files.sort(key=lambda p: p.name != name)  # the recorded name first: usually one hash
    for path in files:
        if sha256_file(path) == identity:
            return str(path), ""
    named = [p for p in files if p.name == name]
    if named:
        return "", f"{name} there has other content ({sha256_file(named[0])[:19]}...)"
    return "", f"none of its {len(files)} weights file(s) has that sha256"


def find_weights(backbone: str, identity: str, name: str = "",
                 search_dirs: Sequence[str | Path] = (), hint: str = "", origin: str = "") -> str:
    """The weights to build ``backbone`` with, found by identity (sha256), never trusted by path.

    Tries, in order: the ``hint`` (the path the weights were read at in training), the folders
    given (``search_dirs``: --weights-dir), $DERMRAY_WEIGHTS_DIR, the Keras cache; then, only
    for Keras' own ImageNet file (``origin`` KERAS), Keras' download, whose hash is checked.
    A file of the user's (origin FILE) is never downloaded: Keras' file of the same name is
    another file. The message of a miss names the identity, the file name and every place
    looked.
    """
    if identity in ("none", "imagenet"):  # seeded random weights; or an unhashed old record
        return identity
    looked: list[str] = []
    if hint:
        path = Path(hint)
        if path.is_file() and sha256_file(path) == identity:
            return str(path)
        looked.append(f"{hint} (where training read it: "
                      f"{'other content' if path.is_file() else 'not there'})")
    for label, folder in _weights_places(search_dirs):
        found, why = _look_in(folder, identity, name)
        if found:
            return found
        looked.append(f"{folder} ({label}: {why})")
    what = (f"the {backbone} weights with {identity}"
            f"{f' (file name {name})' if name else ''}")
    where = "; ".join(looked)
    if (origin or weights_origin(backbone, identity)) == KERAS:
        try:
            path = imagenet_file(backbone)
        except BackboneError as exc:
            raise BackboneError(f"Could not find {what}. Looked in: {where}. Then: {exc}") from None
        found = sha256_file(path)
        if found != identity:
            raise BackboneError(
                f"Keras' ImageNet weights for {backbone} ({path}) are {found}, not {identity}, "
                f"the file the model was trained with. Looked in: {where}. Put the training "
                "weights file in a folder and pass it as --weights-dir.")
        return path
    raise BackboneError(
        f"Could not find {what}. Looked in: {where}. It is not Keras' own ImageNet file, so it "
        "cannot be downloaded: copy that file into a folder and pass --weights-dir FOLDER (or "
        "set DERMRAY_WEIGHTS_DIR), or put it back where training read it.")


def _keras_identity(backbone: str) -> str:
    """The sha256 of Keras' own file where it is known here (VGG19's, from the file Keras
    pins); '' where not."""
    return KERAS_SHA256.get(imagenet_name(backbone), "")


# sha256 of Keras' own ImageNet files, by file name (Keras pins an md5; this is the same file's
# sha256, which is what runs record), so that a record without an origin is still recognised
KERAS_SHA256 = {"vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5":
                "sha256:bde7da0dfd621cbf86e11ce04e4946a9a42634c2cfd21318bba090d860699e35"}


def configure_devices(mixed_precision: bool = False) -> list[str]:
    """Set GPU memory growth before any model is built; optionally mixed precision.

    Returns the GPU names seen (empty on a CPU machine).
    """
    import keras

    gpus: list[str] = []
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised: growth can no longer change
                logger.warning("GPU %s already initialised; memory growth unchanged", gpu.name)
            gpus.append(gpu.name)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return gpus


def build_extractor(name: str, weights: str | None = "imagenet", image_size: int = IMAGE_SIZE):
    """A frozen Keras model: preprocessed (N, S, S, 3) float32 -> (N, dim) features."""
    return build_network([name], weights, image_size)


def build_network(names: Sequence[str], weights: str | None = "imagenet",
                  image_size: int = IMAGE_SIZE):
    """One frozen Keras model for backbones of one application with the same weights: one input,
    one output per name (pooled features or a flattened activation map), so that one forward
    pass gives them all."""
    import keras

    specs = [get_spec(n) for n in names]
    application = specs[0].application
    if any(s.application != application for s in specs):
        raise BackboneError(f"Backbones {list(names)} are not one network: build them apart.")
    resolved = resolve_weights(weights)
    constructor = getattr(keras.applications, application)
    try:
        base = constructor(include_top=False, weights=resolved,
                           input_shape=(image_size, image_size, 3), pooling=None)
    except (ValueError, OSError, KeyError) as exc:
        raise BackboneError(f"Weights {weights} do not fit {application} (include_top=False): "
                            f"{str(exc)[:300]}. Pass the {application} 'notop' weights file, "
                            "'imagenet' or 'none'.") from None
    outputs = []
    for spec in specs:
        if spec.stages:
            pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool_{layer}")(
                base.get_layer(layer).output) for layer in spec.stages]
            outputs.append(keras.layers.Concatenate(name=f"{spec.name}_stages")(pooled))
        elif spec.is_map:
            outputs.append(keras.layers.Flatten(name=f"{spec.name}_map")(
                base.get_layer(spec.layer).output))
        else:  # what pooling="avg" does
            outputs.append(keras.layers.GlobalAveragePooling2D(name=f"{spec.name}_avg")(
                base.output))
    model = keras.Model(base.input, outputs[0] if len(outputs) == 1 else outputs,
                        name="_".join(names) + "_extractor")
    model.trainable = False
    return model


JIT_CHOICES = ("auto", "true", "false")


def use_xla(jit_compile: bool | str, application: str, gpus: Sequence[str]) -> bool:
    """Whether a network's call is XLA-compiled: ``jit_compile`` true or false, or ``auto``:
    on a GPU always, on CPU where the network's registry entry says XLA is the faster call
    (``BackboneSpec.xla_on_cpu``)."""
    choice = str(jit_compile).lower()
    if choice not in JIT_CHOICES:
        raise BackboneError(f"jit_compile must be one of {', '.join(JIT_CHOICES)}; got "
                            f"{jit_compile!r}.")
    if choice != "auto":
        return choice == "true"
    return bool(gpus) or all(spec.xla_on_cpu for spec in BACKBONES.values()
                             if spec.application == application)


def compile_forward(model, jit_compile: bool = True, preprocessing: str | None = None
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """The fastest plain call of a frozen model: a (XLA-)compiled function, not ``predict``.

    On TensorFlow a ``tf.function`` (``jit_compile`` for XLA); on other backends Keras'
    ``predict_on_batch``, which JAX compiles itself. Feed fixed batch shapes to avoid retracing.

    ``preprocessing`` (a mode of ``PREPROCESSING``): the call takes uint8 RGB images and
    preprocesses them itself, inside the compiled graph on TensorFlow where the mode has a graph
    version (``PREPROCESSING_OPS``: fused into the compiled call instead of a NumPy pass over
    the pixels, issue 21's breakdown), with NumPy otherwise; the results are the same bits
    either way. Without it the call takes the preprocessed float32 input.
    """
    import keras

    if preprocessing is not None and preprocessing not in PREPROCESSING:
        raise BackboneError(f"No preprocessing {preprocessing!r}. Known modes: "
                            f"{', '.join(sorted(PREPROCESSING))}.")
    # NumPy's preprocessing ahead of the call: none asked, or no graph version of the mode
    ahead = PREPROCESSING[preprocessing] if preprocessing else (lambda x: x)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if preprocessing in PREPROCESSING_OPS:
            ops = PREPROCESSING_OPS[preprocessing]
            fn = tf.function(lambda x: model(ops(x), training=False), jit_compile=jit_compile,
                             reduce_retracing=True)
            call = lambda x: fn(tf.convert_to_tensor(x, tf.uint8))
        else:
            fn = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile,
                             reduce_retracing=True)
            call = lambda x: fn(tf.convert_to_tensor(ahead(x), tf.float32))
    else:
        call = lambda x: model.predict_on_batch(ahead(x))

    def forward(x: np.ndarray):
        out = call(x)
        if isinstance(out, (list, tuple)):  # a multi-output network: one array per output
            return [_host_array(o) for o in out]
        return _host_array(out)

    return forward


def _host_array(output) -> np.ndarray:
    """A network's output on the host: float16 as it came (under mixed precision; float32
    holds the same values, and an activation map is written as float16 anyway), else float32."""
    array = np.asarray(output)
    return array if array.dtype == np.float16 else array.astype(np.float32, copy=False)


def limit_threads(threads: int) -> None:
    """Run TensorFlow's ops on at most ``threads`` cores (0: leave TensorFlow's default)."""
    import keras

    if threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))


class FrozenExtractor:
    """Frozen backbones, built once: one batch of uint8 RGB images in, embeddings out. No Ray.

    Backbones of one network with the same weights (``resnet50``, ``resnet50_ms`` and the
    ``resnet50_c5b2`` and ``resnet50_c4b6`` activation maps) share one forward pass:
    ``resnet50`` is a column slice of ``resnet50_ms``, and the others are outputs of one
    multi-output model.

    ``preprocessing``: a mode per backbone (a bundle's record); by default each registry entry's.
    """

    def __init__(self, backbones: Sequence[str], weights: dict[str, str], image_size: int,
                 batch_size: int = 32, jit_compile: bool | str = True,
                 mixed_precision: bool = False, seed: int = 0,
                 preprocessing: dict[str, str] | None = None) -> None:
        import keras

        self.gpus = configure_devices(mixed_precision)
        self.backbones = list(backbones)
        self.preprocessing = {n: (preprocessing or {}).get(n) or get_spec(n).preprocessing
                              for n in self.backbones}
        self.batch_size = batch_size
        self.image_size = image_size
        self.sliced: dict[str, tuple[str, int, int]] = {}
        for name in self.backbones:
            spec = get_spec(name)
            source = spec.slice_of[0] if spec.slice_of else ""
            if (source in self.backbones
                    and weights.get(name, "imagenet") == weights.get(source, "imagenet")
                    and self.preprocessing[name] == self.preprocessing[source]):
                self.sliced[name] = spec.slice_of
        # networks: (application, weights, preprocessing) -> the backbones it computes, in order
        groups: dict[tuple[str, str, str], list[str]] = {}
        for name in self.backbones:
            if name not in self.sliced:
                key = (get_spec(name).application, str(weights.get(name, "imagenet")),
                       self.preprocessing[name])
                groups.setdefault(key, []).append(name)
        self.networks: list[tuple[list[str], Callable[[np.ndarray], np.ndarray]]] = []
        self.xla: dict[str, bool] = {}  # application -> whether its call is XLA-compiled
        for (application, weight, mode), names in groups.items():
            # weights=None draws random weights: seed them, or every process (and every rerun)
            # would embed with a different network
            keras.utils.set_random_seed(seed)
            model = build_network(names, weight, image_size)
            # each network's call takes the uint8 images and preprocesses them (in its graph on
            # TensorFlow)
            self.xla[application] = use_xla(jit_compile, application, self.gpus)
            self.networks.append((names, compile_forward(model,
                                                         jit_compile=self.xla[application],
                                                         preprocessing=mode)))

    def dim(self, name: str) -> int:
        return get_spec(name).dim(self.image_size)

    def embed(self, name: str, images: np.ndarray) -> np.ndarray:
        """Embed uint8 images (N, S, S, 3) -> (N, dim) float32 (an activation map flattened)."""
        source = self.sliced.get(name, (name,))[0]
        emb = self.embed_rows(images, {source: np.ones(len(images), bool)})[name]
        return emb.astype(np.float32, copy=False)

    def _run(self, names: list[str], forward: Callable, images: np.ndarray) -> list[np.ndarray]:
        """One network in fixed-size chunks (the last one padded), so XLA compiles once."""
        if images.dtype != np.uint8:
            raise BackboneError(f"The extractor takes uint8 RGB images (0-255), as decode_batch "
                                f"gives them; got {images.dtype}. Pass the decoded images, not "
                                "preprocessed ones: each network preprocesses its own input.")
        outs: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            result = forward(chunk)  # uint8: the call preprocesses (compile_forward)
            parts = result if isinstance(result, list) else [result]
            if not outs:
                # an activation map stays float16 where the network gives float16 (mixed
                # precision): it is written as float16, and a round trip through float32 costs
                # a GPU node's actor two casts of every value (issue 21); vectors are float32
                outs = [np.zeros((len(images), self.dim(name)),
                                 dtype=np.float16 if get_spec(name).is_map
                                 and part.dtype == np.float16 else np.float32)
                        for name, part in zip(names, parts)]
            for out, part in zip(outs, parts):
                out[start:start + n] = part[:n]
        return outs

    def embed_rows(self, images: np.ndarray, needed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every backbone's embeddings of the rows it needs (``needed[name]``, a boolean mask;
        zeros elsewhere). Each network runs once, on the rows that any of its outputs (or a
        slice of them) needs."""
        out: dict[str, np.ndarray] = {}
        for names, forward in self.networks:
            need = np.zeros(len(images), bool)
            for name in names:
                need |= np.asarray(needed.get(name, False), dtype=bool)
                for derived, (source, _, _) in self.sliced.items():
                    if source == name:
                        need |= np.asarray(needed.get(derived, False), dtype=bool)
            embedded = self._run(names, forward, images[need]) if need.any() else []
            for k, name in enumerate(names):
                dtype = embedded[k].dtype if embedded else np.float32
                out[name] = np.zeros((len(images), self.dim(name)), dtype=dtype)
                if embedded:
                    out[name][need] = embedded[k]
        for name, (source, lo, hi) in self.sliced.items():
            out[name] = np.ascontiguousarray(out[source][:, lo:hi])
        return {n: out[n] for n in self.backbones}
