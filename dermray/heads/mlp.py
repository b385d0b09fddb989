"""A Keras dense head on embeddings: standardisation, layers x width, dropout, class weights."""

from __future__ import annotations

import numpy as np

from dermray.heads.base import N_CLASSES
from dermray.heads.keras_base import KerasHead


class MLPHead(KerasHead):
    family = "mlp"

    def __init__(self, layers: int = 1, width: int = 256, dropout: float = 0.3,
                 learning_rate: float = 1e-3, class_weight: str = "none", epochs: int = 50,
                 patience: int = 5, batch_size: int = 64, seed: int = 0) -> None:
        self.layers = layers
        self.width = width
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.class_weight = class_weight
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, X, y, eval_set=None, progress=None) -> MLPHead:
        X = np.asarray(X, dtype=np.float32)
        # the normalisation is a layer of the model, so the saved .keras file carries it
        self._mean, self._var = X.mean(axis=0), X.var(axis=0) + 1e-6
        return super().fit(X, y, eval_set, progress)

    def _build(self, input_shape):
        import keras

        inputs = keras.Input(shape=input_shape)
        x = keras.layers.Normalization(mean=self._mean, variance=self._var)(inputs)
        for _ in range(self.layers):
            x = keras.layers.Dense(self.width, activation="relu")(x)
            x = keras.layers.Dropout(self.dropout)(x)
        outputs = keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="mlp_head")
