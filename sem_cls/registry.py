"""Trained classifiers into MLflow: log a training run's best checkpoint as an MLflow model,
registered if asked, and the model's MLflow flavour (a pyfunc over sem_cls.predictor.Predictor).

The MLflow model's data is the checkpoint file itself and the preprocessing settings of its
training; sem_cls.models.loading reads them (torch.load(weights_only=True): nothing is unpickled
and no code travels with the model; the project must be importable where the model is loaded).
"""

import io
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from sem_cls.config.predictor import is_model_uri
from sem_cls.errors import UserError
from sem_cls.models.loading import (
    CHECKPOINT_FILE,
    DATA_DIR,
    SETTINGS_FILE,
    download_model,
    load_model_folder,
    model_from_checkpoint,
    read_checkpoint,
)
from sem_cls.models.model import SEMModel
from sem_cls.predictor import Predictor

log = logging.getLogger(__name__)

__all__ = ["is_model_uri", "read_checkpoint", "load_model", "log_best_model"]

MODEL_NAME = "model"  # runs:/<run id>/model
# What loading and predicting import; pinned to the versions that trained the model.
REQUIREMENTS = (
    "torch", "torchvision", "timm", "numpy", "scipy", "pillow", "imagehash", "pandas", "mlflow",
    "openvino", "hydra-core", "omegaconf",
)  # fmt: skip
EXAMPLE_SIDE = 320  # the input example is a real test image, reduced to keep the artifact small


def load_model(reference, tracking_uri: str | None = None) -> tuple[SEMModel, dict, dict]:
    """eval.py's trained model, its raw checkpoint (the split it was trained on, its MLflow run)
    and the preprocessing settings recorded with it ({} for a plain file), from a .ckpt path or
    an MLflow model URI."""
    if not is_model_uri(reference):
        checkpoint = read_checkpoint(Path(reference))
        return model_from_checkpoint(checkpoint), checkpoint, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = download_model(str(reference), Path(tmp), tracking_uri) / "data" / DATA_DIR
        if not (data / CHECKPOINT_FILE).is_file():
            raise UserError(
                f"ckpt_path={reference} is an MLflow model, but not one logged by sem-cls "
                f"training (no data/{DATA_DIR}/{CHECKPOINT_FILE} in it)."
            )
        checkpoint = read_checkpoint(data / CHECKPOINT_FILE)
        settings = json.loads((data / SETTINGS_FILE).read_text())
    return model_from_checkpoint(checkpoint), checkpoint, settings


# Columns of the MLflow model's answer (top<i>_class and top<i>_prob follow `confidence`).
OUTPUT_COLUMNS = ("predicted_class", "confidence", "novelty")


class PyfuncClassifier:
    """What `mlflow.pyfunc.load_model` (and `mlflow models serve`) returns for a sem-cls model.

    predict(DataFrame with an `image` column of encoded image files, as bytes) -> DataFrame with
    `predicted_class`, `confidence`, `novelty`, `top<i>_class`/`top<i>_prob` for i <= top_k,
    `prob_<Class>` for every class (temperature-scaled), and `error` (why an image could not be
    read). Missing numbers are None (JSON null). Params (`min_confidence`, `novelty`, `top_k`)
    are checked and applied by the Predictor; a bad value is MLflow's INVALID_PARAMETER_VALUE,
    which the scoring server answers with 400 and the message.
    """

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            settings = self.predictor.with_options(**(params or {}))
        except UserError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        images = [bytes(image) for image in model_input["image"]] if len(model_input) else []
        rows = self.predictor.predict(images, settings)
        names = self.predictor.class_names
        columns = [*OUTPUT_COLUMNS]
        for rank in range(1, settings.top_k + 1):
            columns += [f"top{rank}_class", f"top{rank}_prob"]
        columns += [*(f"prob_{name}" for name in names), "error"]
        records = []
        for row in rows:
            record = {name: row[name] for name in OUTPUT_COLUMNS}
            for rank in range(settings.top_k):
                name, probability = row["top_k"][rank] if row["top_k"] else ("", None)
                record[f"top{rank + 1}_class"], record[f"top{rank + 1}_prob"] = name, probability
            for name in names:
                record[f"prob_{name}"] = (row["probabilities"] or {}).get(name)
            record["error"] = row["error"]
            records.append(record)
        # object columns: None stays None, where a float column would turn it into NaN
        return pd.DataFrame(records, columns=columns, dtype=object)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyfuncClassifier:
    """MLflow's entry point for this model flavour (loader_module)."""
    from sem_cls.config.predictor import PredictorSettings

    model, recorded = load_model_folder(Path(data_path))
    # Per request a handful of images: no loader workers. A converted OpenVINO backbone travels
    # in the model's data folder (see log_best_model).
    settings = PredictorSettings(max_pixels=recorded.get("max_pixels", 50_000_000), num_workers=0)
    return PyfuncClassifier(Predictor(model, settings, recorded, cache_dir=data_path))


def _signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("string", "predicted_class"), ColSpec("double", "confidence")]
    outputs.append(ColSpec("double", "novelty"))
    for rank in range(1, 4):  # the default top_k; a request's top_k gives that many
        outputs += [ColSpec("string", f"top{rank}_class"), ColSpec("double", f"top{rank}_prob")]
    outputs += [ColSpec("double", f"prob_{name}") for name in class_names]
    outputs.append(ColSpec("string", "error"))
    # MLflow fills in a missing param with its default, so the defaults are PredictorSettings'
    # (min_confidence 0: no image is below it). A param the schema does not name is dropped by
    # MLflow with a warning in the server's log, before the model sees the request.
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(outputs),
        params=ParamSchema(
            [
                ParamSpec("min_confidence", "double", 0.0),
                ParamSpec("novelty", "boolean", True),
                ParamSpec("top_k", "long", 3),
            ]
        ),
    )


def _input_example(datamodule):
    """A DataFrame of one real image (the first test image, reduced), JPEG-encoded."""
    import pandas as pd
    from PIL import Image

    from sem_cls.data.images import open_image

    sample = datamodule.samples["test"][0]
    image, _ = open_image(sample.path, "RGB", EXAMPLE_SIDE, datamodule.max_pixels)
    image.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE), Image.Resampling.LANCZOS)
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=90)
    return pd.DataFrame({"image": [encoded.getvalue()]})


@contextmanager
def _tracking(uri: str | None):
    """MLflow resolves model URIs and logs models through the process-wide tracking URI (and a
    registry URI that follows it unless one is set); point it at `uri` for the call, and put
    back exactly what was there (None: leave it)."""
    from sem_cls.compat import mlflow_tracking_uri
    from sem_cls.tracking import tracking_client

    if uri is None:
        yield
        return
    tracking_client(uri)  # the store opened first under its lock, as every process does
    with mlflow_tracking_uri(uri):
        yield


def _register(client, name: str, info, logger) -> str:
    """A new version of registered model `name` in the run's own store (named by `client`, not
    by MLflow's process-wide registry URI, which anything in the process may have set)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=info.model_uri, run_id=logger.run_id, model_id=info.model_id
    )
    return version.version


def _conversion_to_carry(model: SEMModel, engine, engine_dir) -> list[Path]:
    """The converted backbone's files for the MLflow model to carry, so that no load of it
    converts (where OpenVINO runs it: `auto` on a CPU). A run whose features were not cached ran
    no OpenVINO engine: the backbone is converted here, once per machine in `engine_dir`, which
    the next such run reuses."""
    if engine is not None and engine.name == "openvino":
        return engine.files  # converted once, in training
    if engine is not None or not (model.frozen and engine_dir):
        return []
    from sem_cls.data.features import weights_digest
    from sem_cls.models.conversion import cached_conversion
    from sem_cls.models.engines import resolve_engine

    device = next(model.backbone.parameters()).device  # a GPU run's: loads convert, as before
    if resolve_engine("auto", device, frozen=True)[0] != "openvino":
        return []
    try:
        weights = weights_digest(model.backbone)
        return cached_conversion(model.backbone, model.data_config, engine_dir, weights)
    except UserError as err:  # each load then runs the backbone as it can, and says so
        log.warning("The MLflow model carries no converted backbone: %s", err)
        return []


def log_best_model(trainer, datamodule, registry=None, engine_dir=None) -> list[str]:
    """Log the best checkpoint as MLflow model `model` of each MLflow run of `trainer`, with
    the preprocessing it was trained with (the model's info-bar mode, the datamodule's
    settings and feature engine) and the converted backbone (from `engine_dir` where training
    converted none); with
    `registry.name`, register it as a new version and point `registry.alias` at it. Returns the
    URIs to load it by."""
    import mlflow

    # Here, not at the top: the MLflow model's loader (this module) needs no training stack.
    from sem_cls.tracking import mlflow_loggers

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    loggers = mlflow_loggers(trainer.loggers)
    if not (best and loggers and trainer.is_global_zero):
        return []
    name = registry.get("name") if registry else None
    alias = registry.get("alias") if registry else None
    model = trainer.lightning_module.model
    extractor = datamodule.feature_extractor
    engine = extractor.engine if extractor is not None else None
    settings = {
        "class_names": list(model.class_names),
        "backbone": model.spec["backbone"],
        # Preprocessing as training and evaluation had it; features were bf16 where cached.
        "info_bar": model.spec["info_bar"],
        "max_pixels": datamodule.max_pixels,
        "bf16": bool(extractor is not None and extractor.bf16),
        "engine": engine.name if engine is not None else "torch",
        "checkpoint": Path(best).name,
    }
    example = _input_example(datamodule)
    conversion = _conversion_to_carry(model, engine, engine_dir)
    uris = []
    for logger in loggers:
        uri = logger.experiment.tracking_uri
        with tempfile.TemporaryDirectory() as tmp, _tracking(uri):
            data = Path(tmp) / DATA_DIR
            data.mkdir()
            shutil.copyfile(best, data / CHECKPOINT_FILE)
            for part in conversion:
                shutil.copyfile(part, data / part.name)
            (data / SETTINGS_FILE).write_text(
                json.dumps({**settings, "trained_run_id": logger.run_id}, indent=2)
            )
            # In the training run (an active run, so the model joins its experiment).
            with mlflow.start_run(run_id=logger.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    loader_module=__name__,
                    data_path=str(data),
                    signature=_signature(settings["class_names"]),
                    input_example=example,
                    # Given, not inferred: inference would load the model in a subprocess.
                    pip_requirements=[f"{n}=={metadata.version(n)}" for n in REQUIREMENTS],
                    metadata={"class_names": settings["class_names"]},
                )
        uris.append(f"runs:/{logger.run_id}/{MODEL_NAME}")
        if name:
            version = _register(mlflow.MlflowClient(uri, registry_uri=uri), name, info, logger)
            uris.append(f"models:/{name}/{version}")
            if alias:
                mlflow.MlflowClient(uri, registry_uri=uri).set_registered_model_alias(
                    name, alias, version
                )
                uris.append(f"models:/{name}@{alias}")
        log.info("Best checkpoint logged as MLflow model: %s", ", ".join(uris))
    return uris
