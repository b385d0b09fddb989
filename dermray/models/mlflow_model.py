"""An exported bundle as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(frame)``
on a DataFrame of image paths gives the rows `dermray predict` writes (``predict_frame``: the
same decode, predict and skip pieces of ``dermray.models.predict_io``).

Logged as MLflow's "model from code": the model is ``ENTRY`` (a four-line script that builds
``pyfunc_model()``) plus the bundle folder as its artifact ``bundle``; nothing is pickled, and
the bundle keeps its own checks (``load_bundle``) when MLflow loads it. Loading needs dermray
installed where the model is loaded. MLflow is imported only here, inside functions.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from dermray.io.fingerprint import versions
from dermray.models.bundle import Bundle, load_bundle, read_spec
from dermray.models.heads import get_family
from dermray.models.predict_io import Limits, image_id, predict_files

logger = logging.getLogger(__name__)

ARTIFACT = "bundle"  # the bundle folder's artifact key (model/artifacts/bundle)
METADATA = ("age", "sex", "localization")  # optional columns beside "path"
# what the model's environment needs (with the versions that made it), beside its family's own
REQUIREMENTS = ("dermray", "keras", "tensorflow", "tensorflow-cpu", "numpy", "pandas", "pyarrow",
                "pillow", "scikit-learn")

ENTRY = '''"""dermray's exported bundle as an MLflow pyfunc model (the artifact 'bundle')."""
import mlflow.models

from dermray.models.mlflow_model import pyfunc_model

mlflow.models.set_model(pyfunc_model())
'''


def input_paths(model_input: Any) -> list[str]:
    """The image paths of a pyfunc input: a DataFrame's ``path`` column, or a list of paths."""
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise ValueError("dermray's model takes a DataFrame with a 'path' column (one image "
                             f"path or URI per row). Got columns {list(model_input.columns)}.")
        return [str(p) for p in model_input["path"]]
    return [str(p) for p in model_input]


def input_metadata(model_input: Any) -> pd.DataFrame | None:
    """Patient metadata from a DataFrame's age/sex/localization columns, indexed by image_id,
    as `dermray predict --metadata` reads it (None without those columns)."""
    if not isinstance(model_input, pd.DataFrame) or not set(METADATA) & set(model_input.columns):
        return None
    frame = pd.DataFrame({"image_id": [image_id(p) for p in input_paths(model_input)]})
    for column in METADATA:
        frame[column] = model_input[column].to_numpy() if column in model_input else (
            float("nan") if column == "age" else "unknown")
    return frame.drop_duplicates("image_id").set_index("image_id")


def predict_frame(bundle: Bundle, model_input: Any, policy: str = "accuracy",
                  limits: Limits | None = None) -> pd.DataFrame:
    """`dermray predict`'s rows for a pyfunc input: path, image_id, dx, policy, p_<class>; a file
    that cannot be read or decoded is skipped with a warning naming it, as `dermray predict`
    does."""
    rows, problems = predict_files(bundle, input_paths(model_input), input_metadata(model_input),
                                   policy, limits)
    for problem in problems:
        logger.warning("%s", problem)
    return rows


def pyfunc_model():
    """The ``mlflow.pyfunc.PythonModel`` MLflow loads (``ENTRY`` builds it): the bundle loaded
    once from its artifact, then ``predict_frame`` (``params={"policy": ...}`` picks the
    operating point, 'accuracy' by default)."""
    import mlflow.pyfunc

    class BundleModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context: Any) -> None:
            self.bundle = load_bundle(context.artifacts[ARTIFACT])

        # a DataFrame hint: MLflow checks the input against the signature, not the hint
        def predict(self, context: Any, model_input: pd.DataFrame,
                    params: dict[str, Any] | None = None) -> pd.DataFrame:
            return predict_frame(self.bundle, model_input,
                                 (params or {}).get("policy") or "accuracy")

    return BundleModel()


def signature():
    """Input: a ``path`` column (and optional metadata columns); params: the policy (the bundle
    checks it, naming the policies it has)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "path"), ColSpec("double", "age", required=False),
                     ColSpec("string", "sex", required=False),
                     ColSpec("string", "localization", required=False)])
    return ModelSignature(inputs=inputs,
                          params=ParamSchema([ParamSpec("policy", "string", "accuracy")]))


def requirements(bundle_dir: str | Path) -> list[str]:
    """pip requirements of the model: dermray's stack and the family's packages, pinned to the
    versions installed here (those not installed are left out)."""
    spec = read_spec(bundle_dir)  # an ensemble's: every member family's packages
    names = [m.family for m in spec.members] or [spec.family]
    packages = [p for name in names for p in get_family(name).packages]
    found = versions(dict.fromkeys([*REQUIREMENTS, *packages]))
    return [f"{name}=={version}" for name, version in found.items()]


def save_pyfunc(bundle_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model of a local bundle folder to ``path`` (a new folder): MLmodel, the
    code (``ENTRY``), the environment files and the bundle as the artifact ``bundle``."""
    import mlflow.pyfunc

    read_spec(bundle_dir)  # a damaged bundle is refused here, not when a user loads it
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's advice to log an input example: this model's inputs are image files
        warnings.filterwarnings("ignore", ".*An input example was not")
        entry = Path(tmp, "dermray_model.py")
        entry.write_text(ENTRY)
        # MLflow names the artifact's folder after its source: a copy named ARTIFACT
        bundle = shutil.copytree(bundle_dir, Path(tmp, ARTIFACT))
        mlflow.pyfunc.save_model(str(path), python_model=str(entry),
                                 artifacts={ARTIFACT: str(bundle)},
                                 pip_requirements=requirements(bundle_dir),
                                 signature=signature())
    return Path(path)
