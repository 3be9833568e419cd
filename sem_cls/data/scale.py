"""An SEM image's physical scale from its TIFF metadata: pixel size (nm per pixel), magnification,
accelerating voltage (kV) and instrument, as FEI/Thermo Fisher (tag 34682) and Zeiss (tag 34118)
microscopes write them; tifffile parses both. Missing metadata gives empty values, never an error.
"""

import logging
import re
from pathlib import Path

import tifffile

log = logging.getLogger(__name__)

SCALE_FIELDS = ("pixel_size_nm", "magnification", "voltage_kv", "instrument")
TIFF_SUFFIXES = (".tif", ".tiff")
# Zeiss writes lengths and voltages with their unit; to nanometres and kilovolts.
_NM_PER = {"pm": 1e-3, "nm": 1.0, "µm": 1e3, "um": 1e3, "mm": 1e6, "m": 1e9}
_KV_PER = {"V": 1e-3, "kV": 1.0}


def empty_scale() -> dict:
    return dict.fromkeys(SCALE_FIELDS, "")


def read_scale(path: Path | str) -> dict:
    """SCALE_FIELDS of one image file: numbers where its FEI or Zeiss metadata has them, "" where
    not (not a TIFF, no such tag, an unreadable file: scale is information, not a check)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return empty_scale()
    try:
        with tifffile.TiffFile(path) as tiff:
            fei, zeiss = tiff.fei_metadata, tiff.sem_metadata
    except Exception as err:  # noqa: BLE001 -- a damaged TIFF is ingest's to report, not ours
        log.debug("No scale read from %s: %s", path, err)
        return empty_scale()
    if fei:
        return _fei_scale(fei)
    if zeiss:
        return _zeiss_scale(zeiss)
    return empty_scale()


def _fei_scale(fei: dict) -> dict:
    """FEI/Thermo Fisher: [Scan] PixelWidth in metres, [Beam] HV in volts; the magnification
    is relative to the instrument's reference canvas, [Image] MagCanvasRealWidth (metres)."""
    scale = empty_scale()
    scan, beam, image = fei.get("Scan", {}), fei.get("Beam", {}), fei.get("Image", {})
    system = fei.get("System", {})
    if _positive(scan.get("PixelWidth")):
        scale["pixel_size_nm"] = _rounded(scan["PixelWidth"] * 1e9)
    if _positive(image.get("MagCanvasRealWidth")) and _positive(scan.get("HorFieldsize")):
        scale["magnification"] = _rounded(image["MagCanvasRealWidth"] / scan["HorFieldsize"])
    if _positive(beam.get("HV")):
        scale["voltage_kv"] = _rounded(beam["HV"] / 1000)
    scale["instrument"] = str(system.get("SystemType") or system.get("Type") or "FEI").strip()
    return scale


def _zeiss_scale(zeiss: dict) -> dict:
    """Zeiss SmartSEM: `ap_image_pixel_size` (value, unit), `ap_mag` as "50.00 K X",
    `ap_actualkv` (value, unit), `dp_sem` the column."""
    scale = empty_scale()
    size = zeiss.get("ap_image_pixel_size") or zeiss.get("ap_pixel_size")
    if size and len(size) >= 3 and _positive(size[1]) and size[2] in _NM_PER:
        scale["pixel_size_nm"] = _rounded(size[1] * _NM_PER[size[2]])
    mag = zeiss.get("ap_mag")
    if mag and len(mag) >= 2:
        match = re.fullmatch(r"\s*([\d.]+)\s*(K?)\s*X\s*", str(mag[1]))
        if match:
            scale["magnification"] = _rounded(float(match[1]) * (1000 if match[2] else 1))
    voltage = zeiss.get("ap_actualkv") or zeiss.get("ap_manualkv")
    if voltage and len(voltage) >= 3 and _positive(voltage[1]) and voltage[2] in _KV_PER:
        scale["voltage_kv"] = _rounded(voltage[1] * _KV_PER[voltage[2]])
    column = zeiss.get("dp_sem")
    scale["instrument"] = f"Zeiss {column[1]}" if column and len(column) >= 2 else "Zeiss"
    return scale


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _rounded(value: float) -> float:
    """Six significant digits: what the instruments write, without float noise (112.413 nm)."""
    return float(f"{value:.6g}")
