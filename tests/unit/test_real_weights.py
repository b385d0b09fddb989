"""The real ImageNet ResNet50 weights in ../shared on the real full-size images (no Ray).

This is the check that fails when preprocessing is wrong: our embeddings must equal a direct
keras.applications reference and must classify the lesions better than random weights do.
"""

import numpy as np
import pytest
from PIL import Image

from dermray.extract import Embedder, decode_batch

SIZE = 160  # smaller than 224 to keep the suite fast; the comparison is at the same resize


@pytest.fixture(scope="module")
def originals(ham):
    import pandas as pd

    labels = pd.read_csv(ham / "originals_600x450_labels.csv")
    paths = [str(ham / "originals_600x450" / f) for f in labels["file"]]
    batch = {"image_id": labels["image_id"].to_numpy(object), "path": np.asarray(paths, object),
             "split": np.full(len(paths), "val", object), "aug_index": np.zeros(len(paths), int)}
    return batch, labels["dx"].to_numpy()


def _reference(paths, weights):
    import keras

    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE),
                                                                      Image.BILINEAR))
                       for p in paths]).astype(np.float32)
    model = keras.applications.ResNet50(include_top=False, weights=str(weights), pooling="avg",
                                        input_shape=(SIZE, SIZE, 3))
    return model.predict(keras.applications.resnet50.preprocess_input(images), verbose=0)


def test_embeddings_equal_keras_and_beat_random(originals, resnet50_weights):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    batch, dx = originals
    decoded = decode_batch(batch, SIZE, seed=0, draft=False)
    weights = {"resnet50": str(resnet50_weights), "resnet50_ms": str(resnet50_weights)}
    real = Embedder(["resnet50", "resnet50_ms"], weights, SIZE, batch_size=24)(decoded)
    assert real["emb_resnet50"].shape == (71, 2048)
    assert real["emb_resnet50_ms"].shape == (71, 3840)

    ref = _reference(batch["path"], resnet50_weights)
    np.testing.assert_allclose(real["emb_resnet50"], ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(real["emb_resnet50"], real["emb_resnet50_ms"][:, 1792:])

    rand = Embedder(["resnet50"], {"resnet50": "none"}, SIZE, batch_size=24)(decoded)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    acc_real = cross_val_score(clf, real["emb_resnet50"], dx, cv=folds).mean()
    acc_rand = cross_val_score(clf, rand["emb_resnet50"], dx, cv=folds).mean()
    assert acc_real > acc_rand + 0.1, (acc_real, acc_rand)
