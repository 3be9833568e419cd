"""Trained classifiers in and out of MLflow: load one from a checkpoint file or an MLflow model
URI, and log a training run's best checkpoint as an MLflow model, registered if asked.

The MLflow model is a pyfunc whose data is the checkpoint file itself, and this module is its
loader: torch.load(weights_only=True) rebuilds the SEMModel, so nothing is unpickled and no
code travels with the model (the project must be importable where the model is loaded).
"""

import io
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from sem_cls.errors import UserError
from sem_cls.models.build import model_from_checkpoint
from sem_cls.models.engines import create_engine
from sem_cls.models.inference import classify_files, decide, unknown_images
from sem_cls.models.model import SEMModel
from sem_cls.tracking import mlflow_loggers, tracking_client

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # runs:/<run id>/model
MODEL_URI_SCHEMES = ("models:/", "runs:/")
DATA_DIR = "sem_cls_model"  # <model>/data/sem_cls_model/{checkpoint.ckpt,settings.json}
CHECKPOINT_FILE, SETTINGS_FILE = "checkpoint.ckpt", "settings.json"
# What loading and predicting import; pinned to the versions that trained the model.
REQUIREMENTS = (
    "torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy", "scipy", "pillow",
    "imagehash", "pandas", "mlflow", "openvino",
)  # fmt: skip
EXAMPLE_SIDE = 320  # the input example is a real test image, reduced to keep the artifact small


def is_model_uri(reference) -> bool:
    return str(reference).startswith(MODEL_URI_SCHEMES)


def read_checkpoint(path: Path, option: str = "ckpt_path") -> dict:
    """The raw checkpoint of a training run; tensors and plain data only, never code."""
    path = Path(path)
    if path.is_dir():
        found = [str(p) for p in sorted(path.rglob("*.ckpt"))[:3]]
        raise UserError(
            f"{option}={path} is a folder. Point it at a .ckpt file from training"
            + (f", e.g. {', '.join(found)}." if found else " (none in this folder).")
        )
    if not path.is_file():
        raise UserError(f"{option}={path} does not exist. Point it at a .ckpt file from training.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["sem_model"]["class_names"]
    except Exception as err:  # noqa: BLE001 -- any failure here means "not our checkpoint"
        raise UserError(
            f"{option}={path} is not a sem-cls checkpoint ({type(err).__name__}: {err})."
        ) from err
    return checkpoint


def load_checkpoint(path: Path) -> tuple[SEMModel, dict]:
    """The trained model and the raw checkpoint; loads tensors and plain data only, never code.
    The checkpoint holds every weight: no ImageNet weights are fetched."""
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint), checkpoint


def load_model(reference, tracking_uri: str | None = None) -> tuple[SEMModel, dict, dict]:
    """Classifier, raw checkpoint and the preprocessing settings recorded with it ({} for a
    plain file), from a .ckpt path or an MLflow model URI (models:/<name>@<alias>,
    models:/<name>/<version>, runs:/<run id>/model)."""
    if not is_model_uri(reference):
        return *load_checkpoint(Path(reference)), {}
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, _tracking(tracking_uri):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=str(reference), dst_path=tmp)
        except Exception as err:  # noqa: BLE001 -- MLflow raises several kinds for a bad URI
            raise UserError(
                f"ckpt_path={reference} could not be loaded from MLflow at {tracking_uri} "
                f"({type(err).__name__}: {str(err)[:300]}). Check the name, alias or run id in "
                "the MLflow UI, and the tracking URI."
            ) from err
        data = Path(local) / "data" / DATA_DIR
        if not (data / CHECKPOINT_FILE).is_file():
            raise UserError(
                f"ckpt_path={reference} is an MLflow model, but not one logged by sem-cls "
                f"training (no data/{DATA_DIR}/{CHECKPOINT_FILE} in it)."
            )
        model, checkpoint = load_checkpoint(data / CHECKPOINT_FILE)
        settings = json.loads((data / SETTINGS_FILE).read_text())
    return model, checkpoint, settings


class PyfuncClassifier:
    """What `mlflow.pyfunc.load_model` returns for a sem-cls model.

    predict(DataFrame with an `image` column of encoded image files, as bytes) -> DataFrame with
    `predicted_class`, `confidence`, `novelty`, `prob_<Class>` for every class (temperature-
    scaled), and `error` (why an image could not be read; its other columns are empty). Param
    `min_confidence` marks images below it `uncertain`; images unlike the training images are
    `unknown` unless param `novelty` is false.
    """

    def __init__(self, model: SEMModel, settings: dict, data_path: Path | None = None):
        self.model = model.eval()
        self.settings = settings
        self.engine = None  # torch
        if settings.get("engine", "torch") != "torch":
            # The converted backbone travels in the model's data folder (see log_best_model).
            self.engine = create_engine(
                settings["engine"],
                model.backbone,
                tuple(model.data_config["input_size"]),
                settings["bf16"],
                data_path,
            )

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        min_confidence = (params or {}).get("min_confidence")
        use_novelty = bool((params or {}).get("novelty", True))
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for index, data in enumerate(model_input["image"]):
                # Through files, so bytes go the way every other image goes (check, crop, decode).
                files.append(Path(tmp) / f"{index:06d}")
                files[-1].write_bytes(bytes(data))
            probs, errors, novelty = classify_files(
                self.model,
                files,
                info_bar=self.settings["info_bar"],
                max_pixels=self.settings["max_pixels"],
                bf16=self.settings["bf16"],
                num_workers=0,
                progress=False,
                engine=self.engine,
            )
        unknown = unknown_images(self.model, novelty, use_novelty)
        table = pd.DataFrame(
            {
                "predicted_class": decide(probs, self.model.class_names, min_confidence, unknown),
                "confidence": probs.max(axis=1),  # NaN for an unreadable image
                "novelty": novelty if use_novelty else np.nan,
            }
        )
        for index, name in enumerate(self.model.class_names):
            table[f"prob_{name}"] = probs[:, index]
        table["error"] = errors
        return table


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyfuncClassifier:
    """MLflow's entry point for this model flavour (loader_module)."""
    model, _ = load_checkpoint(Path(data_path) / CHECKPOINT_FILE)
    settings = json.loads((Path(data_path) / SETTINGS_FILE).read_text())
    return PyfuncClassifier(model, settings, Path(data_path))


def _signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("string", "predicted_class"), ColSpec("double", "confidence")]
    outputs.append(ColSpec("double", "novelty"))
    outputs += [ColSpec("double", f"prob_{name}") for name in class_names]
    outputs.append(ColSpec("string", "error"))
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(outputs),
        params=ParamSchema(
            [ParamSpec("min_confidence", "double", 0.0), ParamSpec("novelty", "boolean", True)]
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
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    if uri is None:
        yield
        return
    tracking_client(uri)  # the store opened first under its lock, as every process does
    with _use_tracking_uri(uri):
        yield


def log_best_model(trainer, datamodule, registry=None) -> list[str]:
    """Log the best checkpoint as MLflow model `model` of each MLflow run of `trainer`, with
    the preprocessing it was trained with (the model's info-bar mode, the datamodule's
    settings and feature engine); with
    `registry.name`, register it as a new version and point `registry.alias` at it. Returns the
    URIs to load it by."""
    import mlflow

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
    uris = []
    for logger in loggers:
        uri = logger._tracking_uri
        with tempfile.TemporaryDirectory() as tmp, _tracking(uri):
            data = Path(tmp) / DATA_DIR
            data.mkdir()
            shutil.copyfile(best, data / CHECKPOINT_FILE)
            if settings["engine"] == "openvino":  # converted once, in training; not on load
                for part in engine.files:
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
                    registered_model_name=name,
                    await_registration_for=0,  # local stores register at once
                    metadata={"class_names": settings["class_names"]},
                )
        uris.append(f"runs:/{logger.run_id}/{MODEL_NAME}")
        if name:
            version = info.registered_model_version
            uris.append(f"models:/{name}/{version}")
            if alias:
                mlflow.MlflowClient(uri, registry_uri=uri).set_registered_model_alias(
                    name, alias, version
                )
                uris.append(f"models:/{name}@{alias}")
        log.info("Best checkpoint logged as MLflow model: %s", ", ".join(uris))
    return uris
