"""What the two Keras heads share: training with early stopping and progress, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermray.models.heads.base import N_CLASSES, Head, HeadError, KerasScores, class_weights


def epoch_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Validation accuracy and loss as Keras names and computes them (the sparse categorical
    cross-entropy clips probabilities at Keras' epsilon, 1e-7)."""
    p = np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0)
    return {"val_accuracy": float(np.mean(np.argmax(proba, axis=1) == y)),
            "val_loss": float(-np.mean(np.log(p)))}


class KerasHead(Head):
    """Subclasses build ``self._build(input_shape)`` and may transform inputs in ``_inputs``."""

    model_file = "head.keras"
    # what early stopping watches (patience ``self.patience``; the best epoch's weights are
    # restored when training ends, stopped or not)
    stop_on, stop_mode = "val_loss", "min"

    def _build(self, input_shape: tuple[int, ...]):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)

    def _initialise(self, model, X: np.ndarray, y: np.ndarray) -> None:
        """Set a built model's starting weights from the prepared train inputs (a subclass may;
        by default Keras' own draw stands)."""

    def start(self, X: np.ndarray, y: np.ndarray):
        """The prepared train inputs and the model as training starts (seeded, built, its
        starting weights set by ``_initialise``), before any step."""
        import keras

        keras.utils.set_random_seed(self.seed)
        inputs = self._inputs(X)
        model = self._build(inputs.shape[1:])
        self._initialise(model, inputs, np.asarray(y))
        return inputs, model

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set=None, progress=None) -> KerasHead:
        import keras

        self._check_params()
        self._check_xy(X.reshape(len(X), -1) if X.ndim > 2 else X, y)
        inputs, model = self.start(X, y)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        callbacks = []
        if eval_set is not None:
            X_val, y_val = self._inputs(eval_set[0]), np.asarray(eval_set[1])
            scored: dict[str, np.ndarray] = {}

            def validate(epoch: int, logs: dict) -> None:
                # one pass over validation per epoch, with the head's own probabilities (its
                # test-time views too): the numbers the stopping rule watches, the progress
                # reports and selection are the same numbers, and Keras' own validation pass
                # (a second one, without the views) is not run
                scored["proba"] = self._proba(model, X_val)
                logs.update(epoch_scores(y_val, scored["proba"]))

            stopper = self.early_stopping()

            def report(epoch: int, logs: dict) -> None:
                # after the stopping rule has seen the epoch: when this epoch is its best so
                # far (the weights it will restore), the report carries a snapshot of them, so
                # that a trial stopped from outside (ASHA) still has the model it would hand over
                train = {"train_loss": float(logs["loss"])} if "loss" in logs else {}
                snapshot = None
                if stopper.best_epoch == epoch:
                    def snapshot(directory: Path) -> None:
                        self._save_fitted(model, X, directory)
                progress(epoch + 1, scored["proba"], snapshot=snapshot, **train)

            # validate before EarlyStopping: Keras hands every callback the same logs of the
            # epoch; report after it, to know whether the epoch was its best
            callbacks += [keras.callbacks.LambdaCallback(on_epoch_end=validate), stopper]
            if progress is not None:
                callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=report))
        model.fit(inputs, np.asarray(y), epochs=self.epochs, batch_size=self.batch_size,
                  callbacks=callbacks, verbose=0,
                  class_weight=class_weights(np.asarray(y), self.class_weight))
        self.model_ = model
        self._set_fitted(X)
        return self

    def _save_fitted(self, model, X: np.ndarray, directory: Path) -> None:
        """Save ``model`` (a model in training) as this head's fitted model."""
        self.model_ = model
        self._set_fitted(X)
        self.save(directory)

    def early_stopping(self):
        """The stopping rule: ``stop_on`` without improvement for ``patience`` epochs stops
        training, and the best epoch's weights are restored at the end."""
        import keras

        return keras.callbacks.EarlyStopping(monitor=self.stop_on, mode=self.stop_mode,
                                             patience=self.patience, restore_best_weights=True)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        if len(X) == 0:
            raise HeadError("The 'X' parameter of predict_proba must be non-empty.")
        X = self._inputs(X)
        self._check_n_features(X)
        return self._proba(self.model_, X)

    def differentiable_scores(self) -> KerasScores:
        self._check_fitted()
        return KerasScores(self.model_)

    def _proba(self, model, X: np.ndarray) -> np.ndarray:
        """The model's probabilities of prepared inputs (a subclass may average views)."""
        return np.asarray(model.predict(X, batch_size=256, verbose=0), dtype=np.float64)

    def save(self, directory: Path) -> None:
        self._check_fitted()
        directory = Path(directory)
        self._write_params(directory)
        self.model_.save(directory / self.model_file)

    @classmethod
    def load(cls, directory: Path) -> KerasHead:
        import keras

        head = cls(**cls._read_params(directory))
        # safe_mode (the default) refuses to deserialise arbitrary code (Lambda layers)
        head.model_ = keras.models.load_model(Path(directory) / cls.model_file, safe_mode=True)
        head.classes_ = np.arange(N_CLASSES)
        head.n_features_in_ = int(np.prod(head.model_.input_shape[1:]))
        return head
