"""Predictor: a trained model applied to new images, the one path the predict CLI, the demo page
and the MLflow model (REST) all take. Each image is checked as ingest checks it, its info bar
cropped, the backbone's eval transform applied; the class, `uncertain` or `unknown` is decided
by sem_cls.config.predictor.prediction_rows, which eval's per-image predictions call too.

It imports neither Lightning nor torchmetrics: loading a model and classifying an image costs
torch, timm and the model's weights, no more.
"""

import dataclasses
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sem_cls.config.predictor import (  # noqa: F401 -- the decision, for every surface
    UNCERTAIN,
    UNKNOWN,
    PredictorSettings,
    check_top_k,
    prediction_rows,
)
from sem_cls.data.images import open_image, scale_box
from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.ingest import bar_top_of, read_error, unusable
from sem_cls.data.samples import eval_preprocessing
from sem_cls.data.scale import read_scale
from sem_cls.data.workers import worker_init_fn
from sem_cls.errors import UserError
from sem_cls.models.conversion import cached_model, converted_model_key
from sem_cls.models.engines import OpenVINOEngine, TorchEngine, create_engine, resolve_engine
from sem_cls.models.loading import load_model
from sem_cls.models.model import SEMModel

log = logging.getLogger(__name__)

# Settings that shape the loaded engine: fixed for a Predictor's life.
LOAD_SETTINGS = ("engine", "bf16", "device")


class ImagesToClassify(Dataset):
    """(image tensor, "") per file, or (zeros, why it is unusable): a bad file gets a row in the
    output and the others go on. The checks, the bar and the crop are ingest's and training's
    own, from one decode. An item is a file's path, or an image file's bytes (an object read
    from a store)."""

    def __init__(self, files: list[Path | bytes], data_config: dict, info_bar, max_pixels: int):
        self.files = files
        self.crop = InfoBarCrop(info_bar)
        self.transform, self.decode_side = eval_preprocessing(data_config)
        self.max_pixels = max_pixels
        self.shape = tuple(data_config["input_size"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        item = self.files[index]
        in_memory = isinstance(item, bytes | bytearray)
        path = Path(f"#{index}") if in_memory else Path(item)
        try:
            data = bytes(item) if in_memory else path.read_bytes()
        except OSError as err:
            return self.blank(), read_error(path, err)
        try:
            if not data:
                raise ValueError("empty file (0 bytes)")
            image, size = open_image(io.BytesIO(data), "RGB", self.decode_side, self.max_pixels)
            bar_top = bar_top_of(image, data, size[1]) if self.crop.mode == "auto" else size[1]
            box = scale_box(self.crop.box(*size, bar_top), size, image.size)
            if box != (0, 0, *image.size):
                image = image.crop(box)
            return self.transform(image), ""
        except Exception as err:  # any failure to read makes the file unusable, and is reported
            return self.blank(), unusable(path, err)

    def blank(self) -> torch.Tensor:
        """The stand-in for an unusable file: black (H, W, 3) uint8 pixels, as the transform
        hands over."""
        return torch.zeros((*self.shape[1:], self.shape[0]), dtype=torch.uint8)


class Predictor:
    """A loaded SEMModel, its engine and the settings it applies (PredictorSettings, with unset
    preprocessing taken from what the model recorded of its training)."""

    def __init__(
        self,
        model: SEMModel,
        settings: PredictorSettings,
        recorded: dict | None = None,
        cache_dir: str | Path | None = None,
        weights: str | None = None,
        converted: dict[str, bytes] | None = None,
    ):
        """`weights`: the backbone's weights digest, needed where the model was loaded without
        its backbone (Predictor.load, for a converted model in `cache_dir`, or in `converted`
        where this machine has none: another process's OpenVINOEngine.converted_files())."""
        recorded = recorded or {}
        check_top_k(settings, len(model.class_names))
        # Unset preprocessing follows what an MLflow model recorded of its training; a .ckpt
        # file records nothing, and gets training's defaults.
        resolved = {
            "info_bar": settings.info_bar
            if settings.info_bar is not None
            else recorded.get("info_bar", "auto"),
            "bf16": settings.bf16 if settings.bf16 is not None else recorded.get("bf16", True),
            # The same rule as training's data.engine=auto, whatever engine training ran.
            "engine": settings.engine or "auto",
        }
        self.settings = dataclasses.replace(settings, **resolved)
        self.model = model.eval()
        self.device = self._device(settings.device)
        self.model.to(self.device)
        engine = str(getattr(self.settings.engine, "value", self.settings.engine))
        if not model.frozen and engine != "torch":
            raise UserError(
                f"engine={engine} serves a frozen backbone only; this model fine-tuned its "
                "backbone. Set engine=torch."
            )
        self.engine = None
        if model.frozen:
            # A frozen backbone runs as the feature cache ran it in training and evaluation
            # (bf16 where native), so the head sees the features it was fit on.
            kind, why = resolve_engine(engine, self.device, frozen=True)
            if model.backbone is None:  # loaded for its cached converted backbone
                self.engine = OpenVINOEngine(
                    None, model.data_config, self.settings.bf16, cache_dir,
                    weights, architecture=model.spec["backbone"].split(".")[0],
                    num_features=model.spec["num_features"], converted=converted,
                )  # fmt: skip
            elif kind == "torch":
                self.engine = TorchEngine(model.backbone, model.data_config, self.settings.bf16)
            else:
                self.engine = create_engine(
                    kind, model.backbone, model.data_config, self.settings.bf16, cache_dir, weights,
                )  # fmt: skip
            log.info("Engine: %s %s (%s)", self.engine.name, self.engine.precision, why)
        if self.settings.novelty and not model.has_novelty:
            # Said once, so a missing `unknown` is not a surprise.
            log.warning("This model has no novelty references: no image is marked `unknown`.")

    @staticmethod
    def _device(device: str) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise UserError(f"device={device!r} is not a device: give auto, cpu or cuda.") from err
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device={device}, but this machine has no CUDA GPU: give device=cpu.")
        return chosen

    @classmethod
    def load(
        cls,
        reference,
        settings: PredictorSettings,
        tracking_uri: str | None = None,
        cache_dir: str | Path | None = None,
        with_backbone: bool = False,
    ) -> "Predictor":
        """The predictor of a .ckpt file, an MLflow model URI (models:/..., runs:/...) or a
        downloaded MLflow model folder; `cache_dir` keeps converted OpenVINO backbones. A frozen
        backbone whose converted model is cached there is not built at all: neither timm nor
        the backbone module is needed to classify with it, unless `with_backbone` (Grad-CAM
        needs the module)."""
        device = cls._device(settings.device)
        found = {}

        def needs_backbone(spec: dict, backbone_state: dict) -> bool:
            kind, _ = resolve_engine(str(settings.engine or "auto"), device, frozen=True)
            if with_backbone or kind != "openvino":
                return True
            from sem_cls.data.features import state_digest

            found["weights"] = state_digest(backbone_state)
            architecture = spec["backbone"].split(".")[0]  # timm's name without its tag
            input_size = spec["data_config"]["input_size"]
            key = converted_model_key(architecture, found["weights"], input_size)
            return cached_model(cache_dir, key) is None

        model, recorded = load_model(reference, tracking_uri, needs_backbone=needs_backbone)
        return cls(model, settings, recorded, cache_dir, found.get("weights"))

    @property
    def engine_name(self) -> str:
        """What runs the backbone: `openvino` or `torch` (a fine-tuned backbone is torch's)."""
        return self.engine.name if self.engine is not None else "torch"

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def dataset(self, files: list[Path], settings: PredictorSettings | None = None):
        """The images as the model sees them: (tensor, error) per file."""
        settings = settings or self.settings
        return ImagesToClassify(
            files, self.model.data_config, settings.info_bar, settings.max_pixels
        )

    def scores(
        self, files: list[Path], settings: PredictorSettings | None = None, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(N, num_classes) temperature-scaled probabilities (NaN rows where unread), (N,)
        novelty scores (NaN where unread or not scored) and each file's error ("" when read)."""
        settings = settings or self.settings
        num_classes = len(self.class_names)
        if not files:
            return np.zeros((0, num_classes)), np.zeros(0), []
        # One batch is read by this process: a worker would only add its start (~0.3 s).
        workers = settings.num_workers if len(files) > settings.batch_size else 0
        loader = DataLoader(
            self.dataset(files, settings),
            batch_size=settings.batch_size,
            num_workers=workers,
            worker_init_fn=worker_init_fn,
        )
        probabilities, novelty, errors = [], [], []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="Classifying", unit="image", disable=not progress)
        with torch.inference_mode(), bar:
            for images, batch_errors in loader:
                images = images.to(self.device)
                # (B, H, W, 3) uint8 -> (B, num_features)
                features = self.engine(images) if self.engine else self.model.features(images)
                features = features.to(self.device).float()
                logits = self.model.head(features)  # (B, num_features) -> (B, num_classes)
                probabilities.append(self.model.probabilities(logits).cpu())
                novelty.append(self.model.novelty(features).cpu())
                errors += batch_errors
                bar.update(len(images))
        probabilities = torch.cat(probabilities).double().numpy()
        novelty = torch.cat(novelty).double().numpy()
        unread = [bool(error) for error in errors]
        probabilities[unread], novelty[unread] = np.nan, np.nan
        return probabilities, novelty, errors

    def score_images(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (B, num_classes) and novelty scores (B,) of images already prepared as
        `dataset` prepares them ((B, H, W, 3) uint8): for callers that decode elsewhere, such as
        the Ray tasks of sem_cls.scoring. The same steps as `scores`, one batch."""
        with torch.inference_mode():
            images = images.to(self.device)
            # (B, H, W, 3) uint8 -> (B, num_features)
            features = self.engine(images) if self.engine else self.model.features(images)
            features = features.to(self.device).float()
            logits = self.model.head(features)  # (B, num_features) -> (B, num_classes)
            probabilities = self.model.probabilities(logits).cpu().double().numpy()
            novelty = self.model.novelty(features).cpu().double().numpy()
        return probabilities, novelty

    def with_options(self, **options) -> PredictorSettings:
        """This predictor's settings with a request's `options` (REST params, the page);
        the ones that shape the loaded engine cannot change per request."""
        fixed = sorted(name for name in LOAD_SETTINGS if name in options)
        if fixed:
            raise UserError(f"{fixed} are set when the model is loaded, not per request.")
        settings = PredictorSettings.from_params(options, **dataclasses.asdict(self.settings))
        check_top_k(settings, len(self.class_names))
        return settings

    def rows(
        self,
        paths: list,
        probabilities: np.ndarray,
        novelty: np.ndarray,
        errors: list[str],
        settings: PredictorSettings | None = None,
    ) -> list[dict]:
        """prediction_rows with this model's classes and novelty threshold."""
        return prediction_rows(
            paths,
            probabilities,
            novelty,
            errors,
            class_names=self.class_names,
            novelty_threshold=float(self.model.novelty_threshold)
            if self.model.has_novelty
            else None,
            settings=settings or self.settings,
        )

    def predict(
        self, items, settings: PredictorSettings | None = None, progress: bool = False
    ) -> list[dict]:
        """One row per item (prediction_rows): items are image files (paths), or images in
        memory (encoded bytes, PIL images), named by their position in `items`."""
        items = list(items)
        with tempfile.TemporaryDirectory(prefix="sem-cls-") as tmp:
            # Bytes go through files, the way every other image goes (check, crop, decode).
            files, names = [], []
            for index, item in enumerate(items):
                if isinstance(item, str | Path):
                    files.append(Path(item))
                    names.append(str(item))
                    continue
                files.append(Path(tmp) / f"{index:06d}")
                names.append(f"#{index}")
                if isinstance(item, bytes | bytearray | memoryview):
                    files[-1].write_bytes(bytes(item))
                elif hasattr(item, "save"):  # a PIL image
                    buffer = io.BytesIO()
                    item.save(buffer, "PNG")
                    files[-1].write_bytes(buffer.getvalue())
                else:
                    raise UserError(
                        f"item {index} is a {type(item).__name__}: give an image file's path, "
                        "its bytes, or a PIL image."
                    )
            probabilities, novelty, errors = self.scores(files, settings, progress)
            # The physical scale where the file's TIFF metadata has it ("" elsewhere).
            scales = [read_scale(path) for path in files]
        rows = self.rows(names, probabilities, novelty, errors, settings)
        for row, scale in zip(rows, scales, strict=True):
            row.update(scale)
        return rows
