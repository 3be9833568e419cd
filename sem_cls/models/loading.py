"""A trained SEMModel from a training checkpoint, an MLflow model URI or a downloaded MLflow model
folder, without the training stack (no Lightning, no torchmetrics): tensors and plain data are
read with torch.load(weights_only=True), never code, and the backbone is built by timm without
fetching any weights, since the checkpoint holds them all.

Two checkpoint layouts load: the one whose LightningModule holds an SEMModel as `self.model`
(state keys `model.*`, the spec in `checkpoint["sem_model"]`), and the earlier one whose
LightningModule was the classifier itself (keys `backbone.*`, `head.*`, ... at the top level, the
spec read from its hyper-parameters).
"""

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import torch

from sem_cls.config.predictor import check_exists, is_model_uri
from sem_cls.errors import UserError
from sem_cls.models.model import SEMModel

log = logging.getLogger(__name__)

# An MLflow model logged by training: <model>/data/sem_cls_model/{checkpoint.ckpt,settings.json}
DATA_DIR = "sem_cls_model"
CHECKPOINT_FILE, SETTINGS_FILE = "checkpoint.ckpt", "settings.json"
# Buffers of SEMModel that checkpoints from before calibration and novelty lack.
FITTED_BUFFERS = ("temperature", "novelty_references", "novelty_threshold")


def read_checkpoint(path: Path, option: str = "ckpt_path") -> dict:
    """The raw checkpoint of a training run; tensors and plain data only, never code."""
    path = Path(path)
    if path.is_dir():
        found = [str(p) for p in sorted(path.rglob("*.ckpt"))[:3]]
        raise UserError(
            f"{option}={path} is a folder. Point it at a .ckpt file from training"
            + (f", e.g. {', '.join(found)}." if found else " (none in this folder).")
        )
    check_exists(path, option)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "sem_model" not in checkpoint:
            checkpoint["hyper_parameters"]["class_names"]
    except Exception as err:  # noqa: BLE001 -- any failure here means "not our checkpoint"
        raise UserError(
            f"{option}={path} is not a sem-cls checkpoint ({type(err).__name__}: {err})."
        ) from err
    return checkpoint


def _earlier_layout(checkpoint: dict) -> tuple[dict, dict]:
    """Spec and SEMModel state of a checkpoint whose LightningModule was the classifier."""
    hparams = checkpoint["hyper_parameters"]
    spec = {
        "class_names": list(hparams["class_names"]),
        "backbone": hparams.get("backbone", "inception_v3"),
        "head": hparams.get("head", "linear"),
        "head_hidden": hparams.get("head_hidden", 512),
        "head_dropout": hparams.get("head_dropout", 0.0),
        "aux_logits": bool(hparams.get("aux_logits", False)),
        "freeze": hparams.get("freeze", True),
    }
    keep = ("backbone.", "head.")
    state = {
        key: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(keep) or key in FITTED_BUFFERS
    }
    return spec, state


def model_from_checkpoint(checkpoint: dict, needs_backbone=None) -> SEMModel:
    """The SEMModel a raw checkpoint (read_checkpoint) holds, in eval mode on the CPU.
    `needs_backbone(spec, backbone_state)`, if given, may answer False for a frozen backbone that
    will run converted (an OpenVINO model cached for these weights): the model is then built
    without it, and without importing timm."""
    if "sem_model" in checkpoint:
        spec = dict(checkpoint["sem_model"])
        state = {
            key.removeprefix("model."): value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith("model.")
        }
    else:
        spec, state = _earlier_layout(checkpoint)
    if "novelty_references" in state:  # its columns are the backbone's features
        spec.setdefault("num_features", state["novelty_references"].shape[1])
    headless = (
        needs_backbone is not None
        and {"data_config", "num_features"} <= spec.keys()
        and spec.get("frozen", True)
        and not needs_backbone(spec, backbone_state(state))
    )
    if headless:
        state = {key: value for key, value in state.items() if not key.startswith("backbone.")}
    model = SEMModel.from_spec(spec, with_backbone=not headless)
    # Checkpoints from before calibration and novelty: temperature 1, no references.
    for name in FITTED_BUFFERS:
        state.setdefault(name, getattr(model, name))
    # The references' row count is the checkpoint's, not the empty buffer's.
    model.novelty_references = torch.empty_like(state["novelty_references"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def backbone_state(state: dict) -> dict:
    """The backbone's own state dict (its names, its order) out of an SEMModel's."""
    return {
        key.removeprefix("backbone."): value
        for key, value in state.items()
        if key.startswith("backbone.")
    }


def load_checkpoint(path: Path, option: str = "ckpt_path", needs_backbone=None) -> SEMModel:
    return model_from_checkpoint(read_checkpoint(path, option), needs_backbone)


def load_model_folder(
    folder: Path, option: str = "ckpt_path", needs_backbone=None
) -> tuple[SEMModel, dict]:
    """The model and recorded preprocessing settings of an MLflow model folder (the model's
    root, or its data/sem_cls_model/ folder, as MLflow hands it to the loader)."""
    folder = Path(folder)
    data = folder if (folder / CHECKPOINT_FILE).is_file() else folder / "data" / DATA_DIR
    if not (data / CHECKPOINT_FILE).is_file():
        raise UserError(
            f"{option}={folder} is not an MLflow model logged by sem-cls training (no "
            f"data/{DATA_DIR}/{CHECKPOINT_FILE} in it). Give a .ckpt file or a sem-cls model."
        )
    model = load_checkpoint(data / CHECKPOINT_FILE, option, needs_backbone)
    return model, json.loads((data / SETTINGS_FILE).read_text())


def download_model(reference: str, destination: Path, tracking_uri: str | None) -> Path:
    """The MLflow model `reference` (models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<run id>/model) downloaded into `destination`, from the store at `tracking_uri`."""
    import mlflow

    from sem_cls.compat import mlflow_tracking_uri

    # MLflow resolves a models:/ alias through its process-wide registry URI whatever is passed
    # here, so the store is also made the process's for the call (and put back after).
    store = mlflow_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()
    try:
        with store:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=str(reference),
                    dst_path=str(destination),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
            )
    except Exception as err:  # noqa: BLE001 -- MLflow raises several kinds for a bad URI
        raise UserError(
            f"ckpt_path={reference} could not be loaded from MLflow at {tracking_uri} "
            f"({type(err).__name__}: {str(err)[:300]}). Check the name, alias or run id in "
            "the MLflow UI, and the tracking URI."
        ) from err


def load_model(
    reference, tracking_uri: str | None = None, option: str = "ckpt_path", needs_backbone=None
) -> tuple[SEMModel, dict]:
    """The model of a .ckpt file, an MLflow model URI or a downloaded MLflow model folder, and
    the preprocessing settings recorded with it ({} for a .ckpt file: training's defaults);
    `needs_backbone` as model_from_checkpoint takes it."""
    if is_model_uri(reference):
        with tempfile.TemporaryDirectory() as tmp:
            local = download_model(str(reference), Path(tmp), tracking_uri)
            if not (local / "data" / DATA_DIR / CHECKPOINT_FILE).is_file():
                raise UserError(
                    f"{option}={reference} is an MLflow model, but not one logged by sem-cls "
                    f"training (no data/{DATA_DIR}/{CHECKPOINT_FILE} in it)."
                )
            return load_model_folder(local, option, needs_backbone)
    path = Path(reference)
    if path.is_dir() and (path / "MLmodel").is_file():
        return load_model_folder(path, option, needs_backbone)
    return load_checkpoint(path, option, needs_backbone), {}
