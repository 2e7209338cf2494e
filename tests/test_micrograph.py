"""Reading micrographs: real vendor TIFFs and SNE JPEGs, generated TIFF/PNG/BMP variants, data bars."""

from __future__ import annotations

import struct
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from semwatch.config import Settings, load_settings
from semwatch.reading.databar import detect_databar
from semwatch.reading.micrograph import read_micrograph
from semwatch.reading.quality import assess
from semwatch.reading.sidecar import read_sidecar
from semwatch.values import MicrographError

SNE_NAME = "ETRI_ 20 kV_SE_HighVac_x500 __{}.jpg"


def specimen(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A textured grey image in [0.15, 0.85] (float32), like a focused micrograph without a bar."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0), 1.5)
    noise -= noise.min()
    noise /= noise.max()
    return (0.15 + 0.7 * noise).astype(np.float32)


def with_bar(image: np.ndarray, rows: int, *, white: bool = False) -> np.ndarray:
    """`image` with its bottom `rows` replaced by a drawn data bar: black band, white text and line
    (or the reverse, Zeiss style, with a black frame line on top)."""
    out = image.copy()
    bar = np.zeros((rows, image.shape[1]), np.uint8)
    cv2.putText(bar, "SEM HV 5.0 kV  WD 10 mm  100 um", (10, rows // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX,
                0.6, 255, 1)
    bar[rows - 8 : rows - 5, image.shape[1] - 150 : image.shape[1] - 20] = 255
    if white:
        bar = 255 - bar
        bar[0] = 0
    out[-rows:] = bar.astype(np.float32) / 255
    return out


def to_u8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


def to_u16(image: np.ndarray) -> np.ndarray:
    return np.round(image * 65535).astype(np.uint16)


FEI_TEXT = (
    "[User]\r\nDate=03/15/2021\r\nTime=09:05:07 PM\r\n[System]\r\nSystemType=Helios G4 UX\r\n"
    "[Beam]\r\nHV=2000\r\n[EBeam]\r\nHV=2000\r\nHFW=2.56e-05\r\n[Scan]\r\nPixelWidth=2.5e-08\r\n"
    "PixelHeight=2.5e-08\r\nHorFieldsize=2.56e-05\r\n[Image]\r\nResolutionX=1024\r\nResolutionY=400\r\n"
    "MagCanvasRealWidth=0.128\r\n[Detectors]\r\nName=TLD\r\nMode=SE\r\n"
)

ZEISS_TEXT = (
    "0\r\n1024\r\nDP_SEM\r\nSem = Sigma 300\r\nAP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 1.25 µm\r\n"
    "AP_MAG\r\nMag = 250 X\r\nAP_ACTUALKV\r\nEHT = 15.00 kV\r\nDP_DETECTOR_TYPE\r\nDetector = SE2\r\n"
    "AP_DATE\r\nDate :3 Feb 2022\r\nAP_TIME\r\nTime :14:07:33\r\n"
)


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "pixel_nm", "mag", "kv", "detector", "acquired", "bar", "bits"),
    [
        ("fei/Untreated_ME_5KV_1200x_ETD_16bit.tif", 112.413,
          1200, 5.0, "ETD", "2020-02-13T18:32:25", 79, 16),
        ("fei/CS_DC_5KV_1000x_ETD_8bit.tif", 134.896, 1000, 5.0, "ETD", "2020-02-06T12:15:18", 79, 8),
        ("zeiss/FeMoOx_AntiA_04_1k5x_CN.tif", 74.43, 1500, 5.0, "InLens", "2021-07-13T18:23:36", 78, 8),
        ("zeiss/1-as-cast_16_Sch_10k_InLens.tif", 11.16, 10000, 10.0, "InLens", "2019-12-09T11:18:36", 78, 8),
        ("zeiss/1-as-cast_18_Sch_10k_BSD-Compo.tif", 11.16,
          10000, 10.0, "NTS BSD", "2019-12-09T11:21:55", 78, 8),
    ],
)
def test_vendor_tiffs(vendor_dir: Path, settings: Settings, rel: str, pixel_nm: float, mag: float,
                      kv: float, detector: str, acquired: str, bar: int, bits: int) -> None:
    m = read_micrograph(vendor_dir / rel, settings)
    md = m.metadata
    assert md.pixel_size_nm == pytest.approx(pixel_nm, rel=1e-6)
    assert md.magnification == mag
    assert md.voltage_kv == pytest.approx(kv)
    assert md.detector == detector
    assert md.acquired_at == datetime.fromisoformat(acquired)
    assert m.databar_rows == bar
    assert m.bit_depth == bits and m.format == "tiff"
    assert m.pixels.shape == (m.height - bar, m.width)
    assert m.pixels.dtype == np.float32 and m.pixels.flags.c_contiguous
    assert float(m.pixels.min()) >= 0.0 and float(m.pixels.max()) <= 1.0
    assert m.quality.ok, m.quality.reasons


def test_fei_bar_detected_from_pixels_too(vendor_dir: Path, settings: Settings) -> None:
    """Without the metadata (ResolutionY), the FEI bar is still found from the image itself."""
    for path in sorted((vendor_dir / "fei").glob("*.tif")):
        arr = tifffile.imread(path)
        grey = arr.astype(np.float32) / np.iinfo(arr.dtype).max
        assert detect_databar(grey) == 79


def test_sne_jpeg_with_sidecar(ncm_dir: Path, settings: Settings) -> None:
    path = ncm_dir / "622" / SNE_NAME.format(1550)
    m = read_micrograph(path, settings)
    assert (m.format, m.width, m.height, m.bit_depth) == ("jpeg", 1280, 960, 8)
    assert m.databar_rows == 64
    assert m.pixels.shape == (896, 1280) and m.pixels.dtype == np.float32 and m.pixels.flags.c_contiguous
    md = m.metadata
    assert md.vendor == "SEC" and md.instrument == "SNE-4500M Plus"
    assert md.magnification == 500 and md.voltage_kv == 20 and md.detector == "SED"
    assert md.acquired_at == datetime(2019, 9, 2, 8, 35, 2)  # Date "오전 8:35:02", Time 08:35:02
    assert md.extra["brightness"] == "89" and md.extra["contrast"] == "-61"
    assert md.pixel_size_nm is None
    assert md.session is None  # saved into C:\Program Files (x86)\sec\Nanoeye: no session folder
    assert m.quality.ok


def test_sidecar_pm_marker_and_session(ncm_dir: Path) -> None:
    """Afternoon images: 오후 in Date, 24-hour clock in Time; the session is the acquisition folder."""
    found = 0
    for side in sorted((ncm_dir / "811_formation").glob("*.jpg.txt"))[:20]:
        text = side.read_text(encoding="utf-8")
        md = read_sidecar(side)
        assert md.acquired_at is not None
        if "오후" in text:
            assert md.acquired_at.hour >= 12
            found += 1
        assert md.session == "191203_ncm811_formation"
    assert found


def test_every_ncm_image_reads_with_64_row_bar_and_passes_quality(ncm_dir: Path, settings: Settings) -> None:
    paths = sorted(ncm_dir.glob("*/*.jpg"))
    assert len(paths) > 700
    for path in paths[::7]:
        m = read_micrograph(path, settings)
        assert m.databar_rows == 64, path
        assert m.quality.ok, (path, m.quality.reasons)


def test_missing_sidecar_means_unknown_metadata(ncm_dir: Path, settings: Settings, tmp_path: Path) -> None:
    lone = [p for p in sorted(ncm_dir.glob("*/*.jpg")) if not Path(str(p) + ".txt").exists()]
    assert lone, "the shared data has one image without a sidecar"
    m = read_micrograph(lone[0], settings)
    assert m.metadata.magnification is None and m.metadata.vendor is None
    assert m.databar_rows == 64
    # A copy under a non-ASCII, space-containing name reads the same.
    odd = tmp_path / "시료 폴더" / "micrograph é 1.jpg"
    odd.parent.mkdir()
    odd.write_bytes(lone[0].read_bytes())
    assert np.array_equal(read_micrograph(odd, settings).pixels, m.pixels)


def test_read_ncm_jpegs(ncm_dir: Path, settings: Settings) -> None:
    """Ten 1280×960 SNE JPEGs (decode, grey, bar, quality, sidecar) read; how fast is a benchmark's
    question (`semwatch bench`, benchmarks/), not a test's on a loaded machine."""
    paths = sorted(ncm_dir.glob("523/*.jpg"))[:10]
    for path in paths:
        m = read_micrograph(path, settings)
        assert m.pixels.ndim == 2 and m.pixels.size > 0


# --- generated files -----------------------------------------------------------------------------


def test_plain_tiffs_8_16_bit_keep_every_row(settings: Settings, tmp_path: Path) -> None:
    image = specimen()
    for name, data in (("g8.tif", to_u8(image)), ("g16.tif", to_u16(image))):
        tifffile.imwrite(tmp_path / name, data)
        m = read_micrograph(tmp_path / name, settings)
        assert m.databar_rows == 0, name
        assert m.pixels.shape == image.shape
        assert m.bit_depth == (8 if name == "g8.tif" else 16)
        np.testing.assert_allclose(m.pixels, image, atol=1 / 255)
        assert m.metadata.vendor is None and m.metadata.pixel_size_nm is None
        assert m.quality.ok


def test_no_bar_eaten_on_many_plain_images(settings: Settings) -> None:
    """Images without a bar — textures, dark ones, gradients, bright bottoms — keep every row."""
    for seed in range(6):
        img = specimen(300, 400, seed)
        variants = [img, img * 0.2, np.clip(img * 3 - 1, 0, 1), np.linspace(0, 1, 300)[:, None] * img]
        dark_bottom = img.copy()
        dark_bottom[-40:] *= 0.1
        variants.append(dark_bottom)
        for v in variants:
            assert detect_databar(np.ascontiguousarray(v, dtype=np.float32)) == 0


@pytest.mark.parametrize("white", [False, True])
@pytest.mark.parametrize("rows", [30, 64, 78, 100])
def test_generated_bar_detected(rows: int, white: bool, settings: Settings, tmp_path: Path) -> None:
    image = with_bar(specimen(720, 960), rows, white=white)
    tifffile.imwrite(tmp_path / "bar.tif", to_u8(image))
    m = read_micrograph(tmp_path / "bar.tif", settings)
    assert m.databar_rows == rows
    assert m.pixels.shape == (720 - rows, 960)


def test_rgb_and_multipage_tiff(settings: Settings, tmp_path: Path) -> None:
    image = specimen()
    rgb = np.repeat(to_u8(image)[..., None], 3, axis=2)
    rgb[..., 0] = 255 - rgb[..., 0]  # not grey: luminance weights matter
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    m = read_micrograph(tmp_path / "rgb.tif", settings)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    np.testing.assert_allclose(m.pixels, expected, atol=1e-6)

    with tifffile.TiffWriter(tmp_path / "multi.tif") as tw:
        tw.write(to_u16(image))
        tw.write(np.zeros((50, 60), np.uint16))
        tw.write(np.full((480, 640), 65535, np.uint16))
    m = read_micrograph(tmp_path / "multi.tif", settings)
    assert (m.width, m.height, m.bit_depth) == (640, 480, 16)
    np.testing.assert_allclose(m.pixels, image, atol=1 / 65535 + 1e-6)

    lzw = tmp_path / "lzw.tif"  # OpenCV writes LZW: decoded by OpenCV's libtiff (no imagecodecs here)
    cv2.imwrite(str(lzw), to_u16(image))
    with tifffile.TiffFile(lzw) as tif:
        assert tif.pages.first.compression == 5
    m = read_micrograph(lzw, settings)
    assert m.bit_depth == 16
    np.testing.assert_allclose(m.pixels, image, atol=1 / 65535 + 1e-6)


def test_fei_like_tiff(settings: Settings, tmp_path: Path) -> None:
    """Another FEI instrument (Helios), 16-bit: ResolutionY gives the bar, HFW the magnification."""
    image = with_bar(specimen(470, 1024), 70)
    path = tmp_path / "helios.tif"
    tifffile.imwrite(path, to_u16(image), extratags=[(34682, "s", 0, FEI_TEXT, True)])
    m = read_micrograph(path, settings)
    md = m.metadata
    assert md.vendor == "Thermo Fisher (FEI)" and md.instrument == "Helios G4 UX"
    assert md.pixel_size_nm == pytest.approx(25.0)
    assert md.magnification == pytest.approx(5000)
    assert md.voltage_kv == pytest.approx(2.0) and md.detector == "TLD"
    assert md.acquired_at == datetime(2021, 3, 15, 21, 5, 7)
    assert m.databar_rows == 70 and m.pixels.shape == (400, 1024)


def test_zeiss_like_tiff(settings: Settings, tmp_path: Path) -> None:
    image = specimen(600, 800)
    path = tmp_path / "sigma.tif"
    raw = np.frombuffer(ZEISS_TEXT.encode("cp1252"), np.uint8)  # Zeiss writes "µm" in cp1252
    tifffile.imwrite(path, to_u8(image), extratags=[(34118, 1, raw.size, raw, True)])
    m = read_micrograph(path, settings)
    md = m.metadata
    assert md.vendor == "Zeiss" and md.instrument == "Sigma 300"
    assert md.pixel_size_nm == pytest.approx(1250.0)
    assert md.magnification == 250 and md.voltage_kv == pytest.approx(15.0) and md.detector == "SE2"
    assert md.acquired_at == datetime(2022, 2, 3, 14, 7, 33)
    assert m.databar_rows == 0


def test_png_16_bit_bmp_and_forced_bar(settings: Settings, tmp_path: Path) -> None:
    image = specimen()
    ok, png = cv2.imencode(".png", to_u16(image))
    assert ok
    (tmp_path / "a.png").write_bytes(png.tobytes())
    m = read_micrograph(tmp_path / "a.png", settings)
    assert (m.format, m.bit_depth) == ("png", 16)
    np.testing.assert_allclose(m.pixels, image, atol=1 / 65535 + 1e-6)

    cv2.imwrite(str(tmp_path / "b.bmp"), to_u8(image))
    m = read_micrograph(tmp_path / "b.bmp", settings)
    assert (m.format, m.bit_depth, m.pixels.shape) == ("bmp", 8, image.shape)

    forced = settings.replace(reading=load_settings(None, environ={}, overrides={
        "reading": {"databar_rows": 20}}).reading)
    assert read_micrograph(tmp_path / "b.bmp", forced).pixels.shape == (460, 640)
    too_many = settings.replace(reading=load_settings(None, environ={}, overrides={
        "reading": {"databar_rows": 480}}).reading)
    with pytest.raises(MicrographError, match="databar_rows"):
        read_micrograph(tmp_path / "b.bmp", too_many)


def test_quality_fails_blank_blurred_saturated(ncm_dir: Path, settings: Settings) -> None:
    q = settings.quality
    real = read_micrograph(ncm_dir / "622" / SNE_NAME.format(1550), settings).pixels
    assert assess(real, q).ok
    blank = assess(np.full((400, 400), 0.5, np.float32), q)
    assert not blank.ok and any("blank" in r for r in blank.reasons)
    for blurred_image in (
        cv2.GaussianBlur(real, (0, 0), 4),
        cv2.blur(real, (25, 25)),
        # blurred, low contrast and stored as 8-bit: quantisation steps must not pass for detail
        np.round((0.2 + 0.3 * cv2.GaussianBlur(real, (0, 0), 5)) * 255).astype(np.float32) / 255,
    ):
        blurred = assess(blurred_image, q)
        assert not blurred.ok and any("focus" in r for r in blurred.reasons), blurred
    saturated = assess(np.clip(real * 4.0, 0, 1), q)
    assert not saturated.ok and any("saturated" in r for r in saturated.reasons)
    flat = assess((0.5 + 0.1 * (real - real.mean())).astype(np.float32), q)
    assert not flat.ok and any("dynamic range" in r for r in flat.reasons)


SNE_SIDECAR = (
    "[Image Info]\r\nModel : SNE-4500M Plus\r\nDate : 2020-01-05 {marker} {clock}\r\n{time_line}"
    "File Name : D:\\DATA\\lot 7\\200105_ncm622_pristine\\img 1.jpg\r\nAcceleated Voltage :  15 kV\r\n"
    "Magnification : x1.5k \r\nDetector Mode : BSE\r\n[   - Image Process]\r\nBrightness : 97\r\n"
    "Contrast : -169\r\n"
)


@pytest.mark.parametrize(
    ("marker", "clock", "time_line", "expected"),
    [
        ("오후", "12:05:09", "", datetime(2020, 1, 5, 12, 5, 9)),
        ("오전", "12:05:09", "", datetime(2020, 1, 5, 0, 5, 9)),
        ("오후", "7:34:06", "", datetime(2020, 1, 5, 19, 34, 6)),
        ("오후", "7:34:06", "Time : 19:34:06.1234567\r\n", datetime(2020, 1, 5, 19, 34, 6)),
        ("PM", "7:34:06", "", datetime(2020, 1, 5, 19, 34, 6)),
        ("오후", "7:34:06", "Time : 25:61:00\r\n", datetime(2020, 1, 5, 19, 34, 6)),
    ],
)
def test_sidecar_variants(tmp_path: Path, marker: str, clock: str, time_line: str,
                          expected: datetime) -> None:
    side = tmp_path / "img 1.jpg.txt"
    text = SNE_SIDECAR.format(marker=marker, clock=clock, time_line=time_line)
    side.write_bytes(text.encode("utf-8"))
    md = read_sidecar(side)
    assert md.acquired_at == expected
    assert (md.magnification, md.voltage_kv, md.detector) == (1500, 15, "BSE")
    assert md.session == "200105_ncm622_pristine"
    assert md.extra["brightness"] == "97" and md.extra["contrast"] == "-169"
    side.write_bytes(text.encode("cp949"))  # older software: Korean Windows code page
    assert read_sidecar(side).acquired_at == expected


def test_other_text_beside_image_is_not_sne_metadata(settings: Settings, tmp_path: Path) -> None:
    image = tmp_path / "scan.tif"
    tifffile.imwrite(image, to_u8(specimen()))
    (tmp_path / "scan.txt").write_text("[SemImageFile]\nInstructName=S-4800\nMagnification=2000\n",
                                       encoding="utf-8")
    assert read_micrograph(image, settings).metadata.vendor is None
    (tmp_path / "scan.tif.txt").write_bytes(b"\xff\xfe\x00garbage" * 10)
    assert read_micrograph(image, settings).metadata.vendor is None


def _packed_12_bit_tiff(values: np.ndarray) -> bytes:
    """An uncompressed TIFF with 12-bit samples packed MSB-first (as cameras write them)."""
    h, w = values.shape
    flat = values.astype(np.uint16).reshape(-1, 2)
    a, b = flat[:, 0], flat[:, 1]
    packed = np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], axis=1).astype(np.uint8).tobytes()
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 12), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, len(packed))]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count)
        ifd += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
    return b"II*\x00" + struct.pack("<I", 8 + len(packed)) + packed + ifd + struct.pack("<I", 0)


def test_12_bit_tiff(settings: Settings, tmp_path: Path) -> None:
    image = specimen()
    path = tmp_path / "twelve.tif"
    path.write_bytes(_packed_12_bit_tiff(np.round(image * 4095)))
    m = read_micrograph(path, settings)
    assert m.bit_depth == 12
    np.testing.assert_allclose(m.pixels, image, atol=2 / 4095)
    assert m.quality.ok


def test_imagej_calibration_planar_rgb_and_stacks(settings: Settings, tmp_path: Path) -> None:
    image = to_u8(specimen())
    tifffile.imwrite(tmp_path / "ij.tif", image, imagej=True, resolution=(80.0, 80.0),
                     metadata={"unit": "um"})
    assert read_micrograph(tmp_path / "ij.tif", settings).metadata.pixel_size_nm == pytest.approx(12.5)
    tifffile.imwrite(tmp_path / "dpi.tif", image, resolution=(72, 72))  # 72 dpi is not a pixel size
    assert read_micrograph(tmp_path / "dpi.tif", settings).metadata.pixel_size_nm is None

    planes = np.stack([image, 255 - image, image // 2])
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    m = read_micrograph(tmp_path / "planar.tif", settings)
    expected = cv2.cvtColor(np.ascontiguousarray(np.moveaxis(planes, 0, -1)), cv2.COLOR_RGB2GRAY)
    np.testing.assert_allclose(m.pixels, expected / 255, atol=1e-6)

    stack = np.stack([image, np.zeros_like(image), np.full_like(image, 255)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True)
    first = read_micrograph(tmp_path / "stack.tif", settings).pixels
    np.testing.assert_allclose(first, image / 255, atol=1e-6)


def test_fei_without_pixel_width_uses_field_width(settings: Settings, tmp_path: Path) -> None:
    text = FEI_TEXT.replace("PixelWidth=2.5e-08\r\n", "")
    path = tmp_path / "fei.tif"
    tifffile.imwrite(path, to_u8(with_bar(specimen(470, 1024), 70)), extratags=[(34682, "s", 0, text, True)])
    assert read_micrograph(path, settings).metadata.pixel_size_nm == pytest.approx(25.0)


def test_overflowing_numbers_in_metadata_are_unknown(tmp_path: Path) -> None:
    """'x999…9' (400 digits) parses to inf: an unknown value, never an infinite magnification that
    would reach the tiling's scale factors."""
    from semwatch.reading.vendor import from_fei, parse_magnification

    side = tmp_path / "img.jpg.txt"
    side.write_text(
        f"[Image Info]\r\nMagnification : x{'9' * 400}\r\nAcceleated Voltage : {'9' * 400} kV\r\n",
        encoding="utf-8",
    )
    md = read_sidecar(side)
    assert md.vendor == "SEC" and md.magnification is None and md.voltage_kv is None
    assert parse_magnification("1e999 X") is not None  # "1" then "e": a plain number, finite
    assert parse_magnification("9" * 400) is None
    fei = from_fei({"Scan": {"PixelWidth": "1e999"}, "EBeam": {"HFW": "1e-999", "HV": "1e999"},
                    "Image": {"MagCanvasRealWidth": "0.128"}})
    assert fei.metadata.pixel_size_nm is None and fei.metadata.voltage_kv is None
    assert fei.metadata.magnification is None
