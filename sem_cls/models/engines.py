"""Feature engines: what runs a frozen backbone, (B, H, W, 3) uint8 pixels as the eval transform
hands them over -> (B, num_features), normalising the whole batch where the backbone runs.

`torch` runs the timm module itself (bf16 autocast if asked), on whatever device it sits.
`openvino` runs it converted once by OpenVINO (cached on disk, sem_cls.models.conversion) and
compiled for this CPU: bf16 where the CPU has it
(AVX512-BF16/AMX), f32 elsewhere. `auto`, the default, is OpenVINO for a wholly frozen backbone
on one CPU process (measured faster on every CPU tried, docs/performance.md) and torch for GPUs,
fine-tuning and DDP.
"""

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sem_cls.data.features import FeatureCache, weights_digest
from sem_cls.data.features import architecture as backbone_architecture
from sem_cls.data.samples import normalised
from sem_cls.errors import UserError
from sem_cls.models.conversion import (
    cached_model,
    convert_backbone,
    converted_model_key,
    import_openvino,
)

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")


def resolve_engine(
    kind: str, device: torch.device, frozen: bool, distributed: bool = False
) -> tuple[str, str]:
    """The engine that runs a backbone on `device` when `kind` is asked for, and why."""
    if kind != "auto":
        return kind, f"engine={kind} asked for"
    if not frozen:
        return "torch", "auto: the backbone learns (fine-tuning)"
    if device.type != "cpu":
        return "torch", f"auto: the backbone runs on {device}"
    if distributed:
        return "torch", "auto: DDP ranks share the extraction"
    try:
        import openvino  # noqa: F401
    except ImportError as err:
        return "torch", f"auto: OpenVINO cannot be imported ({err})"
    return "openvino", "auto: a frozen backbone on the CPU, where OpenVINO is the faster engine"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: AVX512-BF16/AMX CPUs, Ampere and newer GPUs.
    Elsewhere bf16 autocast is emulated, and many times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class TorchEngine:
    """The backbone module itself, in inference mode, channels_last, bf16 autocast if asked
    and the device computes bf16 natively (fp32 elsewhere, said once in the log)."""

    name = "torch"

    def __init__(self, backbone: nn.Module, data_config: dict, bf16: bool):
        self.backbone = backbone
        self.mean, self.std = tuple(data_config["mean"]), tuple(data_config["std"])
        self.bf16 = bool(bf16) and native_bf16(self.device)
        if bf16 and not self.bf16:
            log.info("No native bf16 on %s (AVX512-BF16/AMX): features in fp32.", self.device)
        self.num_features = backbone.num_features

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.backbone.eval()
        device = self.device
        # Moved as uint8 (a quarter of the bytes), normalised as one batch where it runs.
        images = normalised(images.to(device), self.mean, self.std)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features = self.backbone(images)  # (B, 3, H, W) -> (B, num_features)
        return features.float()


class OpenVINOEngine:
    """The backbone converted by OpenVINO (once per architecture, weights and input size; cached
    on disk) and compiled for this machine's CPU, in bf16 or f32, with the normalisation in
    front of it: it takes the eval transform's (B, H, W, 3) uint8 pixels."""

    name = "openvino"
    device = torch.device("cpu")

    def __init__(
        self,
        backbone: nn.Module | None,
        data_config: dict,
        bf16: bool,
        cache_dir: str | Path | None,
        weights: str,
        threads: int | None = None,
        architecture: str | None = None,
        num_features: int | None = None,
        converted: dict[str, bytes] | None = None,
    ):
        """`backbone` None: the converted model is in `cache_dir` (cached_model) or, where it is
        not, in `converted` (another process's `converted_files()`); `architecture` and
        `num_features` say what it is."""
        ov = import_openvino()
        core = openvino_core()
        native = openvino_bf16()
        if bf16 and not native:
            log.info("This CPU has no native bf16 (AVX512-BF16/AMX): OpenVINO runs in f32.")
        self.precision = "bf16" if bf16 and native else "fp32"
        self.backbone = backbone  # what the converted model was made from; None when cached
        self.weights = weights
        if backbone is not None:
            architecture, num_features = backbone_architecture(backbone), backbone.num_features
        self.num_features = num_features
        self.input_size = tuple(data_config["input_size"])
        self.key = converted_model_key(architecture, weights, self.input_size)
        cache_dir = Path(cache_dir) if cache_dir else None
        xml = cached_model(cache_dir, self.key)
        if xml:
            log.info("OpenVINO model from cache: %s", xml)
            model = core.read_model(xml)
        elif backbone is None and converted:
            model = core.read_model(
                converted[".xml"].decode(), ov.Tensor(np.frombuffer(converted[".bin"], np.uint8))
            )
        elif backbone is None:
            raise ValueError(f"No cached OpenVINO model {self.key} in {cache_dir} to run.")
        else:
            model = convert_backbone(ov, backbone, self.input_size, self.key, cache_dir)
            xml = cached_model(cache_dir, self.key)
        # The cached .xml, .bin and .json, which an MLflow model carries along; none uncached.
        suffixes = (".xml", ".bin", ".json") if xml else ()
        self.files = [xml.with_suffix(suffix) for suffix in suffixes]
        model = self._with_normalisation(ov, model, data_config)
        config = {
            # One stream, lowest latency per batch: measured faster than the throughput hint
            # for whole batches on a few cores.
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as err:
            raise UserError(
                f"OpenVINO could not compile {architecture} for this CPU "
                f"({str(err)[:300]}). Set data.engine=torch."
            ) from err
        self.request = self.compiled.create_infer_request()

    def converted_files(self) -> dict[str, bytes] | None:
        """The converted model's .xml and .bin as bytes, for a process on another machine
        (None when it was not cached)."""
        if not self.files:
            return None
        return {path.suffix: path.read_bytes() for path in self.files[:2]}

    @staticmethod
    def _with_normalisation(ov, model, data_config: dict):
        """The model with uint8 (B, H, W, 3) input: to f32, minus mean, over std (both in 0-255
        units), to (B, 3, H, W), compiled into the graph, where it runs on the batch in the
        engine's threads instead of per image in the loader's workers."""
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(
            [255 * value for value in data_config["mean"]]
        ).scale([255 * value for value in data_config["std"]]).convert_layout(ov.Layout("NCHW"))
        return ppp.build()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"The OpenVINO engine takes the eval transform's uint8 pixels, not {images.dtype}."
            )
        pixels = np.ascontiguousarray(images.detach().cpu().numpy())
        # (B, H, W, 3) -> (B, num_features); copied out, the request reuses its buffer.
        features = self.request.infer({0: pixels}, share_inputs=True)[0]
        return torch.from_numpy(np.array(features, dtype=np.float32))


@functools.cache
def openvino_core():
    """One OpenVINO Core for the whole process, never released. Each Core's CPU plugin points the
    thread's alternate signal stack at its own and restores the previous one when released: two
    Cores released in the order they were made leave it pointing at freed memory, and the next
    signal with a Python handler (Ctrl-C, a DataLoader worker's exit) crashes the process."""
    return import_openvino().Core()


def openvino_bf16() -> bool:
    """Whether OpenVINO computes bf16 natively on this CPU (AVX512-BF16/AMX); elsewhere it would
    emulate it, so the engine runs f32."""
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def create_engine(
    kind: str,
    backbone: nn.Module,
    data_config: dict,
    bf16: bool,
    cache_dir: str | Path | None = None,
    weights: str | None = None,
    threads: int | None = None,
):
    """The engine `kind` (torch or openvino; resolve_engine turns auto into one) for a frozen
    backbone and its `data_config` (input size, mean, std). `weights` is the backbone's weights
    digest (sem_cls.data.features.weights_digest), which keys the OpenVINO model cache."""
    if kind == "torch":
        return TorchEngine(backbone, data_config, bf16)
    if kind != "openvino":  # the config schema admits ENGINES only; auto is resolved before
        raise ValueError(f"Unknown feature engine {kind!r}; one of {list(ENGINES)}.")
    device = next(backbone.parameters()).device
    if device.type != "cpu":
        raise UserError(
            f"data.engine=openvino runs on the CPU, but the backbone is on {device}. "
            "Set data.engine=torch for GPU runs."
        )
    if weights is None:
        weights = weights_digest(backbone)
    return OpenVINOEngine(backbone, data_config, bf16, cache_dir, weights, threads)


class FeatureExtractor:
    """A frozen backbone's features for the loaders: the engine that runs it (`kind`, one of
    ENGINES) and the FeatureCache that keeps them. The entry points build it from the `data`
    config and hand it to the datamodule; the engine is made on first use, once the backbone
    sits on the device the run extracts on."""

    def __init__(
        self,
        kind: str,
        backbone: nn.Module,
        data_config: dict,
        bf16: bool,
        cache: FeatureCache,
        engine_dir: Path | None = None,
    ):
        self.kind, self.backbone, self.data_config = kind, backbone, dict(data_config)
        self.bf16, self.cache, self.engine_dir = bf16, cache, engine_dir
        self.engine, self.choice = None, None

    @classmethod
    def from_config(cls, data, model) -> "FeatureExtractor | None":
        """The extractor of `data.engine` for a frozen SEMModel with `data.cache_features` and a
        `data.cache_dir`; None where batches must be images (the backbone runs on each)."""
        cache_dir = data.get("cache_dir")
        if not (model.frozen and data.cache_features and cache_dir):
            log.info("Feature cache off: the backbone runs on every batch of every epoch.")
            return None
        cache = FeatureCache(Path(cache_dir) / "features")
        engine_dir = Path(data.get("engine_dir") or Path(cache_dir) / "engines")
        return cls(
            data.get("engine", "auto"), model.backbone, model.data_config, data.bf16, cache,
            engine_dir,
        )  # fmt: skip

    def get_engine(self, distributed: bool = False):
        """The engine, built on first use where the backbone now sits (torch on a GPU); the
        choice and its reason are logged, and kept in `choice` for the run's record."""
        if self.engine is None:
            device = next(self.backbone.parameters()).device
            kind, why = resolve_engine(self.kind, device, frozen=True, distributed=distributed)
            if kind != "torch" and device.type != "cpu":
                log.warning("data.engine=%s runs on CPU only; this GPU run uses torch.", kind)
                kind, why = "torch", f"data.engine={kind} runs on CPU only"
            weights = self.cache.weights(self.backbone)
            self.engine = create_engine(
                kind, self.backbone, self.data_config, self.bf16, self.engine_dir, weights
            )
            self.choice = f"{kind} {self.engine.precision} ({why})"
            log.info("Feature engine: %s", self.choice)
        return self.engine

    def features(
        self, preprocessing: dict, dataset, image_digests: list[str], batch_size: int,
        num_workers: int, strategy=None,
    ) -> np.ndarray:  # fmt: skip
        """(N, num_features) features of `dataset`'s images, from the cache or extracted into
        it; under DDP (`strategy`) the ranks share the extraction."""
        if strategy is not None:
            # The datamodule's setup runs before the strategy moves the model: extract where
            # the model will run.
            self.backbone.to(strategy.root_device)
        return self.cache.features(
            self.get_engine(distributed=strategy is not None and strategy.world_size > 1),
            preprocessing, dataset, image_digests,
            batch_size=batch_size, num_workers=num_workers, strategy=strategy,
        )  # fmt: skip
