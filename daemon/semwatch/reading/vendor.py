"""Vendor metadata inside TIFFs → `Metadata` (+ the data-bar height where the vendor records it).

- Thermo Fisher / FEI (`FEI_HELIOS`/`FEI_SFEG` tag, tifffile `fei_metadata`): `Scan.PixelWidth` in
  metres, `Beam.HV` in volts, `Detectors.Name`, `User.Date` + `User.Time` (US format, 12-hour),
  `Image.ResolutionY` = specimen rows above the data bar; magnification = `MagCanvasRealWidth / HFW`.
- Zeiss (`CZ_SEM` tag, tifffile `sem_metadata`): values are tuples `(label, value[, unit])`:
  `ap_image_pixel_size`, `ap_mag` ("1.50 K X"), `ap_actualkv` (EHT), `dp_detector_type`, `ap_date`
  + `ap_time`, `dp_sem` (instrument). Zeiss does not record the data-bar height.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from semwatch.values import Metadata

_LENGTH_NM = {"pm": 1e-3, "nm": 1.0, "µm": 1e3, "μm": 1e3, "um": 1e3, "mm": 1e6, "m": 1e9}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class VendorInfo:
    metadata: Metadata
    specimen_rows: int | None = None  # rows above the data bar, where the vendor records it


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _NUMBER.search(value)
        return float(m.group()) if m else None
    return None


def _positive(value: float | None) -> float | None:
    """A usable physical value: positive and finite ("1e999" in a tag parses to inf, which would
    reach the tiling's scale factors)."""
    return value if value is not None and value > 0 and math.isfinite(value) else None


def _parse_datetime(text: str, formats: tuple[str, ...]) -> datetime | None:
    for fmt in formats:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def _section(meta: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = meta.get(name)
    return value if isinstance(value, dict) else {}


def from_fei(meta: Mapping[str, object]) -> VendorInfo:
    scan, beam, image = _section(meta, "Scan"), _section(meta, "Beam"), _section(meta, "Image")
    ebeam, user, system = _section(meta, "EBeam"), _section(meta, "User"), _section(meta, "System")
    detectors = _section(meta, "Detectors")
    hv = _positive(_float(beam.get("HV", ebeam.get("HV"))))
    hfw = _positive(_float(ebeam.get("HFW", scan.get("HorFieldsize"))))
    res_x = _positive(_float(image.get("ResolutionX")))
    pixel_m = _positive(_float(scan.get("PixelWidth"))) or (hfw / res_x if hfw and res_x else None)
    canvas = _positive(_float(image.get("MagCanvasRealWidth", image.get("ScreenMagCanvasRealWidth"))))
    mag = canvas / hfw if canvas and hfw else None
    acquired = None
    if isinstance(user.get("Date"), str):
        stamp = f"{user['Date']} {user.get('Time', '')}".strip()
        acquired = _parse_datetime(
            stamp,
            ("%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S", "%d.%m.%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S",
             "%m/%d/%Y"),
        )
    rows = image.get("ResolutionY")
    detector = detectors.get("Name")
    instrument = system.get("SystemType") or system.get("Type")
    extra = {k: str(v) for k, v in (("mode", detectors.get("Mode")), ("wd_m", ebeam.get("WD"))) if v}
    return VendorInfo(
        Metadata(
            vendor="Thermo Fisher (FEI)",
            instrument=str(instrument).strip() if instrument else None,
            pixel_size_nm=pixel_m * 1e9 if pixel_m else None,
            # FEI shows magnification as a whole number; HFW ratios land a hair off (1199.998).
            magnification=(round(mag) if mag >= 100 else round(mag, 2)) if mag else None,
            voltage_kv=hv / 1000.0 if hv else None,
            detector=str(detector) if detector else None,
            acquired_at=acquired,
            extra=extra,
        ),
        specimen_rows=rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None,
    )


def _zeiss_value(meta: Mapping[str, object], key: str) -> tuple[object, str | None]:
    """(value, unit) of a Zeiss entry stored as (label, value[, unit]) or as a plain value."""
    entry = meta.get(key)
    if isinstance(entry, tuple | list):
        value = entry[1] if len(entry) > 1 else None
        unit = entry[2] if len(entry) > 2 and isinstance(entry[2], str) else None
        return value, unit
    return entry, None


def parse_magnification(text: object) -> float | None:
    """'1.50 K X' → 1500, '500 X' → 500, 'x500' → 500, 'x1.5k' → 1500, '1.2 M X' → 1.2e6."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return _positive(float(text))
    if not isinstance(text, str):
        return None
    m = re.search(r"([-+]?\d+(?:\.\d+)?)\s*([kKmM]?)\s*[xX]?", text)
    if not m:
        return None
    scale = {"": 1.0, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    return _positive(float(m.group(1)) * scale)


def from_zeiss(meta: Mapping[str, object]) -> VendorInfo:
    pixel, unit = _zeiss_value(meta, "ap_image_pixel_size")
    if pixel is None:
        pixel, unit = _zeiss_value(meta, "ap_pixel_size")
    pixel_nm = _float(pixel)
    if pixel_nm is not None:
        factor = _LENGTH_NM.get((unit or "nm").strip())
        pixel_nm = pixel_nm * factor if factor else None
    kv, kv_unit = _zeiss_value(meta, "ap_actualkv")
    if kv is None:
        kv, kv_unit = _zeiss_value(meta, "ap_manualkv")
    voltage = _float(kv)
    if voltage is not None and kv_unit and kv_unit.strip().lower() == "v":
        voltage /= 1000.0
    date, _ = _zeiss_value(meta, "ap_date")
    clock, _ = _zeiss_value(meta, "ap_time")
    acquired = None
    if isinstance(date, str):
        acquired = _parse_datetime(
            f"{date} {clock if isinstance(clock, str) else ''}".strip(),
            ("%d %b %Y %H:%M:%S", "%d-%b-%Y %H:%M:%S", "%d.%m.%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S",
             "%d %b %Y"),
        )
    detector, _ = _zeiss_value(meta, "dp_detector_type")
    if not detector:
        detector, _ = _zeiss_value(meta, "dp_detector_channel")
    instrument, _ = _zeiss_value(meta, "dp_sem")
    mag, _ = _zeiss_value(meta, "ap_mag")
    serial, _ = _zeiss_value(meta, "sv_serial_number")
    return VendorInfo(
        Metadata(
            vendor="Zeiss",
            instrument=str(instrument) if instrument else None,
            pixel_size_nm=_positive(pixel_nm),
            magnification=parse_magnification(mag),
            voltage_kv=_positive(voltage),
            detector=str(detector) if detector else None,
            acquired_at=acquired,
            extra={"serial_number": str(serial)} if serial else {},
        )
    )


_IMAGEJ_UNITS_NM = {"nm": 1.0, "nanometer": 1.0, "micron": 1e3, "microns": 1e3, "um": 1e3, "µm": 1e3,
                    "μm": 1e3, "mm": 1e6, "millimeter": 1e6}


def from_imagej(meta: Mapping[str, object], x_resolution: object) -> VendorInfo | None:
    """Pixel size from an ImageJ TIFF calibrated in a length unit (`unit` + XResolution in pixels
    per unit). Plain TIFF resolution tags (72 dpi and the like) are not physical and are ignored."""
    unit = meta.get("unit")
    factor = _IMAGEJ_UNITS_NM.get(unit.strip().lower()) if isinstance(unit, str) else None
    if factor is None or not isinstance(x_resolution, tuple) or len(x_resolution) != 2:
        return None
    num, den = (_float(v) for v in x_resolution)
    if not num or not den:
        return None
    return VendorInfo(Metadata(pixel_size_nm=_positive(factor * den / num), extra={"calibration": "ImageJ"}))
