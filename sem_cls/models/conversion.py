"""A frozen backbone converted by OpenVINO, and the on-disk cache of conversions: one entry per
architecture, weights and input size (and OpenVINO version), `<key>.xml/.bin` with `<key>.json`,
which vouches for both; shared by every run and entry point on the machine. A damaged or foreign
entry is converted again, never trusted."""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from sem_cls.data.features import architecture
from sem_cls.errors import UserError

log = logging.getLogger(__name__)


def converted_model_key(architecture: str, weights: str, input_size) -> str:
    """The cache key of a converted backbone: architecture, weights digest, input size and the
    OpenVINO version that converted it."""
    from importlib.metadata import version

    description = {
        "architecture": architecture,
        "weights": weights,
        "input_size": list(input_size),
        "openvino": version("openvino").split("-")[0],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_model(cache_dir: str | Path | None, key: str) -> Path | None:
    """The converted model's .xml under `cache_dir` when its entry is whole and is what its
    .json says (key and both files' sha256); None otherwise. A damaged or foreign entry is
    never trusted: it is converted again and replaced."""
    if not cache_dir:
        return None
    xml = Path(cache_dir) / f"{key}.xml"
    record = xml.with_suffix(".json")
    if not record.is_file():
        if xml.exists():
            log.warning("OpenVINO cache entry %s has no record of its files: converted again.", xml)
        return None
    try:
        expected = json.loads(record.read_text())
        ok = expected.get("key") == key and all(
            expected.get(path.suffix) == _file_digest(path)
            for path in (xml, xml.with_suffix(".bin"))
        )
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        log.warning("OpenVINO cache entry %s is damaged or not this model's: converted again.", xml)
        return None
    return xml


def import_openvino():
    try:
        import openvino
    except ImportError as err:
        raise UserError(
            f"data.engine=openvino, but OpenVINO cannot be imported ({err}). Install the pinned "
            "version from requirements.txt (pip install -r requirements.txt) or set "
            "data.engine=torch."
        ) from err
    return openvino


def convert_backbone(ov, backbone: nn.Module, input_size, key: str, cache_dir: Path | None):
    """The backbone converted (an OpenVINO model taking (B, 3, H, W) of `input_size`), and
    written to `cache_dir` as entry `key` with the record of its files."""
    log.info("Converting the backbone with OpenVINO (once per backbone and weights)")
    example = torch.zeros(1, *input_size)
    try:
        with torch.no_grad():
            # Traced here without torch's trace check, which runs the backbone again (1.5 s of
            # InceptionV3's 3.7 s on 2 cores); the features are checked against torch's by the
            # tests instead. OpenVINO converts a traced module as it is.
            traced = torch.jit.trace(backbone.eval(), example, strict=False, check_trace=False)
            model = ov.convert_model(traced, example_input=example)
    except Exception as err:  # noqa: BLE001 -- the converter raises many kinds
        raise UserError(
            f"OpenVINO could not convert this backbone ({type(err).__name__}: "
            f"{str(err)[:300]}). Set data.engine=torch."
        ) from err
    # Any batch size; the weights stay f32 on disk, the precision is chosen at compile time.
    model.reshape([-1, *input_size])
    if cache_dir:
        xml = cache_dir / f"{key}.xml"
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_dir / f"{key}.partial-{os.getpid()}.xml"
        record = partial.with_suffix(".json")
        try:
            ov.save_model(model, partial, compress_to_fp16=False)
            files = {".xml": partial, ".bin": partial.with_suffix(".bin")}
            digests = {suffix: _file_digest(path) for suffix, path in files.items()}
            record.write_text(json.dumps({"key": key, **digests}))
            # The record last: it is what makes the entry trusted.
            for suffix, path in files.items():
                os.replace(path, xml.with_suffix(suffix))
            os.replace(record, xml.with_suffix(".json"))
        finally:
            for path in (partial, partial.with_suffix(".bin"), record):
                path.unlink(missing_ok=True)
        log.info("OpenVINO model cached: %s", xml)
    return model


def cached_conversion(backbone: nn.Module, data_config: dict, cache_dir: Path, weights: str):
    """The converted backbone's .xml, .bin and .json in `cache_dir`, converted there first where
    it has no whole entry; nothing compiled (for an MLflow model to carry them)."""
    key = converted_model_key(architecture(backbone), weights, tuple(data_config["input_size"]))
    cache_dir = Path(cache_dir)
    if cached_model(cache_dir, key) is None:
        convert_backbone(import_openvino(), backbone, data_config["input_size"], key, cache_dir)
    return [cache_dir / f"{key}{suffix}" for suffix in (".xml", ".bin", ".json")]
