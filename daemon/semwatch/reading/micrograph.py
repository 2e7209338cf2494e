"""Reading one micrograph file into a `values.Micrograph` (float32 grey in [0, 1], data bar removed).

Order of work, so that bad files fail fast and nothing huge is ever allocated: the file is opened
only through `safefs.open_regular` (never blocks on a FIFO, never reads a device, follows links only
as the `Confinement` allows), size checks, format from the file's signature (not its extension),
image size from the header (refused above `[reading] max_pixels` or, counting every sample and
plane the decoder would produce, `[reading] max_decoded_mb` before decoding), truncation checks,
then decoding —
TIFF with tifffile (vendor metadata from its tags), JPEG/PNG/BMP with OpenCV (metadata from an SNE
sidecar `<image>.jpg.txt` where there is one). Every failure is a `MicrographError` with one line.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import tifffile

from semwatch.config import Settings
from semwatch.reading import quality as quality_mod
from semwatch.reading.databar import detect_databar
from semwatch.reading.sidecar import read_sidecar, sidecar_path
from semwatch.reading.vendor import VendorInfo, from_fei, from_imagej, from_zeiss
from semwatch.safefs import UNCONFINED, Confinement, RefusedFile, open_regular, sha256_bounded
from semwatch.values import Metadata, Micrograph, MicrographError

# Luma weights (ITU-R BT.601, as OpenCV's grey conversion) for RGB images.
_RGB_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# How far into a JPEG the header parser looks for the frame header (EXIF/ICC segments come first).
_JPEG_HEADER_LIMIT = 4 * 1024 * 1024
_CV2_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION

# tifffile logs its own complaint about a malformed file before raising; ours is the one line that
# counts (stored with the image, printed by `inspect`), so keep its warnings off the console.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Header:
    """What the file's header says, read without decoding the pixels."""

    format: str  # "tiff", "jpeg", "png", "bmp"
    width: int
    height: int
    bit_depth: int
    # What decoding would allocate: width × height × samples × bytes per sample × planes.
    decoded_bytes: int = 0


def sniff_format(head: bytes) -> str | None:
    """The image format from the first bytes of a file, or None."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    return None


# --- file and header checks --------------------------------------------------------------------


def _open_checked(path: Path, settings: Settings,
                  confine: Confinement = UNCONFINED) -> tuple[BinaryIO, int]:
    """Open `path` through `safefs.open_regular` (no stat-then-open race: the checks are made on
    the descriptor that is read) and check it is non-empty and within the size limit."""
    try:
        fd, st = open_regular(path, confine=confine)
    except RefusedFile as exc:  # FIFO, socket, device, directory, a link the policy forbids
        raise MicrographError(str(exc.strerror)) from None
    except FileNotFoundError:
        raise MicrographError("no such file") from None
    except PermissionError:
        raise MicrographError("permission denied") from None
    except OSError as exc:
        raise MicrographError(f"cannot read file: {exc.strerror or exc}") from None
    limit = settings.reading.max_file_mb * 1024 * 1024
    if st.st_size == 0 or st.st_size > limit:
        os.close(fd)
        if st.st_size == 0:
            raise MicrographError("empty file (0 bytes)")
        raise MicrographError(
            f"file too large ({st.st_size / 1048576:.1f} MB > [reading] max_file_mb "
            f"{settings.reading.max_file_mb:g})"
        )
    return os.fdopen(fd, "rb"), st.st_size


def _jpeg_header(fh: BinaryIO, size: int) -> Header:
    data = fh.read(min(size, _JPEG_HEADER_LIMIT))
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise MicrographError("corrupt JPEG header (bad marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise MicrographError("corrupt JPEG header (bad segment length)")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > len(data):
                break
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            if width == 0 or height == 0:
                raise MicrographError("JPEG header gives no image size")
            return Header("jpeg", width, height, precision,
                          _nbytes(width, height, max(1, components), precision))
        pos += 2 + length
    if size <= len(data) and pos + 4 > len(data):
        raise MicrographError("truncated JPEG (no frame header)")
    raise MicrographError("corrupt JPEG header (no frame header)")


def _png_header(fh: BinaryIO) -> Header:
    data = fh.read(33)
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise MicrographError("truncated or corrupt PNG header")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0:
        raise MicrographError("PNG header gives no image size")
    # Grey, -, RGB, palette (expanded to RGB), grey+alpha, -, RGBA; depths below 8 unpack to bytes.
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour, 4)
    return Header("png", width, height, depth, _nbytes(width, height, channels, depth))


def _bmp_header(fh: BinaryIO) -> Header:
    data = fh.read(54)
    if len(data) < 26:
        raise MicrographError("truncated BMP header")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:
        width, height, _planes, bpp = struct.unpack("<hhHH", data[18:26])
    elif dib >= 40 and len(data) >= 30:
        width, height, _planes, bpp = struct.unpack("<iiHH", data[18:30])
    else:
        raise MicrographError("corrupt BMP header")
    if width <= 0 or height == 0:
        raise MicrographError("BMP header gives no image size")
    # Palette and 16-bit pixels are expanded to 3 bytes (BGR), 32-bit to 4.
    per_pixel = 3 if bpp <= 24 else max(4, math.ceil(bpp / 8))
    return Header("bmp", width, abs(height), bpp, _nbytes(width, abs(height), per_pixel, 8))


def _nbytes(width: int, height: int, samples: int, bits: int, planes: int = 1) -> int:
    """Bytes a decoder allocates for the pixels: every sample of every plane, whole bytes each."""
    return width * height * samples * max(1, math.ceil(bits / 8)) * planes


def _check_pixels(header: Header, settings: Settings) -> None:
    """Refuse, from the header alone, an image whose decoding would take more memory than the
    settings allow (pixel count, and decoded bytes: a small compressed file can claim gigabytes)."""
    if header.width <= 0 or header.height <= 0:
        raise MicrographError(f"{header.format.upper()} header gives no image size")
    limit = settings.reading.max_pixels
    if header.width * header.height > limit:
        raise MicrographError(
            f"image too large: header says {header.width}×{header.height} pixels "
            f"(> [reading] max_pixels {limit})"
        )
    max_mb = settings.reading.max_decoded_mb
    if header.decoded_bytes > max_mb * 1048576:
        raise MicrographError(
            f"image too large to decode: {header.decoded_bytes / 1048576:.0f} MB decoded "
            f"(> [reading] max_decoded_mb {max_mb:g})"
        )


def _raster_header(fh: BinaryIO, fmt: str, size: int) -> Header:
    """The header of a JPEG, PNG or BMP (the formats OpenCV decodes), read without decoding."""
    if fmt == "jpeg":
        return _jpeg_header(fh, size)
    if fmt == "png":
        return _png_header(fh)
    return _bmp_header(fh)


def _sniff_open(fh: BinaryIO) -> str:
    fmt = sniff_format(fh.read(32))
    fh.seek(0)
    if fmt is None:
        raise MicrographError("not an image (unrecognised file signature)")
    return fmt


# --- TIFF --------------------------------------------------------------------------------------


def _tiff(fh: BinaryIO) -> tifffile.TiffFile:
    try:
        # The stream is a file descriptor opened by safefs, whose `.name` is an int: name it.
        return tifffile.TiffFile(fh, name="micrograph.tif")
    except MicrographError:
        raise
    except Exception as exc:  # tifffile raises many types on malformed input
        raise MicrographError(f"not a valid TIFF ({_short(exc)})") from None


def _first_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    try:
        page = tif.pages.first
    except Exception as exc:
        raise MicrographError(f"not a valid TIFF ({_short(exc)})") from None
    if page is None:
        raise MicrographError("TIFF has no image")
    return page


def _tiff_header(tif: tifffile.TiffFile) -> Header:
    page = _first_page(tif)
    try:
        width, height = int(page.imagewidth), int(page.imagelength)
        depth = max(1, int(getattr(page, "imagedepth", 1) or 1))
        bits = int(page.bitspersample)
        samples = int(page.samplesperpixel)
        dtype = page.dtype
        itemsize = int(dtype.itemsize) if dtype is not None else 0
    except Exception as exc:
        raise MicrographError(f"not a valid TIFF ({_short(exc)})") from None
    if samples > 8 or bits > 64:  # would multiply the memory the pixel limit is meant to bound
        raise MicrographError(f"unsupported TIFF layout ({samples} samples of {bits} bits per pixel)")
    # `page.asarray()` decodes the first page whole: every sample (chunky or planar), every plane
    # of a volume (imagedepth), each in tifffile's dtype (24-bit samples come as 4-byte words).
    decoded = _nbytes(width, height, max(1, samples), max(bits, 8 * itemsize), depth)
    # Volumes would be decoded whole: count their pixels too.
    return Header("tiff", width, height * depth if depth > 1 else height, bits, decoded)


def _tiff_vendor(tif: tifffile.TiffFile) -> VendorInfo | None:
    try:
        fei = tif.fei_metadata
        if fei:
            return from_fei(fei)
        zeiss = tif.sem_metadata
        if zeiss:
            return from_zeiss(zeiss)
        imagej = tif.imagej_metadata
        if imagej:
            tag = tif.pages.first.tags.get(282)  # XResolution
            return from_imagej(imagej, tag.value if tag is not None else None)
    except Exception:  # malformed vendor tags: the image itself may still be fine
        return None
    return None


def _tiff_grey(tif: tifffile.TiffFile, size: int) -> np.ndarray:
    page = _first_page(tif)
    offsets = getattr(page, "dataoffsets", ()) or ()
    counts = getattr(page, "databytecounts", ()) or ()
    if any(o + c > size for o, c in zip(offsets, counts, strict=False)):
        raise MicrographError("truncated TIFF (image data runs past the end of the file)")
    try:
        arr = page.asarray()
    except Exception as exc:
        text = _short(exc)
        if "imagecodecs" in text:
            # LZW, PackBits, JPEG-in-TIFF ...: tifffile needs imagecodecs for these, OpenCV's libtiff
            # decodes them (first page, grey), so fall back to it rather than add a dependency.
            return _decode_cv2(tif.filehandle, Header("tiff", page.imagewidth, page.imagelength,
                                                      page.bitspersample), size)
        raise MicrographError(f"cannot decode TIFF ({text})") from None
    axes = str(page.axes)
    arr = np.asarray(arr)
    # Keep Y, X and samples; take the first index of any other axis (volumes, planes).
    index = tuple(slice(None) if ax in "YXS" else 0 for ax in axes) if len(axes) == arr.ndim else None
    if index is not None:
        arr = arr[index]
        kept = [ax for ax in axes if ax in "YXS"]
        if "S" in kept and kept.index("S") == 0:
            arr = np.moveaxis(arr, 0, -1)
    photometric = int(page.photometric) if page.photometric is not None else 1
    if photometric == 3 and page.colormap is not None and arr.ndim == 2:  # palette
        cmap = np.asarray(page.colormap, dtype=np.float32)
        arr = np.tensordot(_RGB_WEIGHTS, cmap, axes=1)[arr] / 65535.0
        return np.ascontiguousarray(arr, dtype=np.float32)
    bits = int(page.bitspersample)
    # 10-, 12- and 14-bit data come unpacked into 16-bit words: scale by the bits actually used.
    full = float(2**bits - 1) if arr.dtype.kind == "u" and bits < arr.dtype.itemsize * 8 else None
    grey = _to_unit_grey(arr, full)
    if photometric == 0:  # MinIsWhite
        grey = 1.0 - grey
    return grey


# --- pixel conversion --------------------------------------------------------------------------


def _to_unit_grey(arr: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """Any decoded array → contiguous 2-D float32 in [0, 1], scaled by the dtype's range (or
    `full_scale` for unsigned data that uses fewer bits than its dtype)."""
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels >= 3:
            rgb = arr[..., :3]
            if rgb.dtype == np.uint8 or rgb.dtype == np.uint16:
                arr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
            else:
                arr = rgb.astype(np.float32) @ _RGB_WEIGHTS
        else:
            arr = arr[..., 0]
    if arr.ndim != 2:
        raise MicrographError(f"unsupported image layout (shape {arr.shape})")
    dtype = arr.dtype
    if dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(dtype, np.unsignedinteger):
        out = arr.astype(np.float32)
        out *= np.float32(1.0 / (full_scale or np.iinfo(dtype).max))
        return np.minimum(out, np.float32(1.0), out=out) if full_scale else out
    if np.issubdtype(dtype, np.signedinteger):
        info = np.iinfo(dtype)
        out = arr.astype(np.float32)
        out -= np.float32(info.min)
        out *= np.float32(1.0 / (float(info.max) - float(info.min)))
        return out
    if np.issubdtype(dtype, np.floating):
        out = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:  # not already in [0, 1]: stretch the data's own range
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        return np.ascontiguousarray(out, dtype=np.float32)
    raise MicrographError(f"unsupported pixel type {dtype}")


# --- OpenCV formats ----------------------------------------------------------------------------


def _check_complete(fh: BinaryIO, header: Header, size: int) -> None:
    """Refuse files cut short (a copy still in progress, a broken transfer) before decoding."""
    tail_len = min(size, 4096)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    if header.format == "jpeg":
        # Entropy-coded data never contains FF D9 (FF is stuffed), so its presence marks the end.
        if b"\xff\xd9" not in tail.rstrip(b"\x00"):
            raise MicrographError("truncated JPEG (no end-of-image marker)")
    elif header.format == "png":
        if b"IEND" not in tail[-32:]:
            raise MicrographError("truncated PNG (no IEND chunk)")
    elif header.format == "bmp":
        fh.seek(10)
        (offset,) = struct.unpack("<I", fh.read(4))
        fh.seek(30)
        compression_raw = fh.read(4)
        compression = struct.unpack("<I", compression_raw)[0] if len(compression_raw) == 4 else 0
        stride = ((header.width * header.bit_depth + 31) // 32) * 4
        if compression == 0 and offset + stride * header.height > size:
            raise MicrographError("truncated BMP (pixel data runs past the end of the file)")


def _decode_cv2(fh: BinaryIO | tifffile.FileHandle, header: Header, size: int) -> np.ndarray:
    fh.seek(0)
    buf = np.frombuffer(fh.read(size), dtype=np.uint8)
    try:
        arr = cv2.imdecode(buf, _CV2_FLAGS)
    except cv2.error as exc:
        raise MicrographError(f"cannot decode {header.format.upper()} ({_short(exc)})") from None
    if arr is None:
        raise MicrographError(f"cannot decode {header.format.upper()} (corrupt image data)")
    if arr.shape[:2] != (header.height, header.width):
        raise MicrographError(
            f"decoded size {arr.shape[1]}×{arr.shape[0]} differs from header "
            f"{header.width}×{header.height}"
        )
    return _to_unit_grey(arr)


# --- data bar and the whole read ---------------------------------------------------------------


def _databar_rows(grey: np.ndarray, vendor: VendorInfo | None, settings: Settings) -> int:
    forced = settings.reading.databar_rows
    height = grey.shape[0]
    if forced >= 0:
        if forced >= height:
            raise MicrographError(
                f"[reading] databar_rows {forced} leaves no specimen rows (image has {height} rows)"
            )
        return forced
    if vendor is not None and vendor.specimen_rows is not None and vendor.specimen_rows <= height:
        return height - vendor.specimen_rows
    return detect_databar(grey)


def content_sha256(path: str | Path, settings: Settings, *, confine: Confinement,
                   on_chunk: Callable[[], None] | None = None) -> str:
    """The sha256 an image is known by: its bytes through the one safe open, bounded as every read
    of an image is (`[reading] max_file_mb`). Raises what `safefs.sha256_bounded` raises."""
    mb = settings.reading.max_file_mb
    return sha256_bounded(path, confine=confine, max_bytes=int(mb * 1024 * 1024),
                          limit=f"[reading] max_file_mb {mb:g}", on_chunk=on_chunk)


def read_micrograph(path: Path, settings: Settings, *, confine: Confinement = UNCONFINED) -> Micrograph:
    """Read one micrograph (see the module docstring); raises `MicrographError` with one line.

    `confine`: where the image and its sidecar may be read from (the watch folder and its symlink
    policy for the daemon; `UNCONFINED` for files named on the command line)."""
    path = Path(path)
    try:
        return _read(path, settings, confine)
    except MicrographError:
        raise
    except MemoryError:
        raise MicrographError("not enough memory to decode the image") from None
    except Exception as exc:  # a bug on hostile input must cost this file, not the daemon
        raise MicrographError(f"cannot read {path.suffix.lstrip('.') or 'file'} ({_short(exc)})") from None


def _read(path: Path, settings: Settings, confine: Confinement) -> Micrograph:
    fh, size = _open_checked(path, settings, confine)
    vendor: VendorInfo | None = None
    try:
        with fh:
            fmt = _sniff_open(fh)
            if fmt == "tiff":  # parse the TIFF structure once: header, pixels, tags
                with _tiff(fh) as tif:
                    header = _tiff_header(tif)
                    _check_pixels(header, settings)
                    grey = _tiff_grey(tif, size)
                    vendor = _tiff_vendor(tif)
            else:
                header = _raster_header(fh, fmt, size)
                _check_pixels(header, settings)
                _check_complete(fh, header, size)
                grey = _decode_cv2(fh, header, size)
    except OSError as exc:
        raise MicrographError(f"cannot read file: {exc.strerror or exc}") from None

    height, width = grey.shape
    metadata = vendor.metadata if vendor is not None else _sidecar_metadata(path, confine)
    rows = _databar_rows(grey, vendor, settings)
    pixels = np.ascontiguousarray(grey[: height - rows])
    return Micrograph(
        path=path,
        format=header.format,
        width=width,
        height=height,
        bit_depth=header.bit_depth,
        pixels=pixels,
        databar_rows=rows,
        metadata=metadata,
        quality=quality_mod.assess(pixels, settings.quality),
    )


def _sidecar_metadata(path: Path, confine: Confinement = UNCONFINED) -> Metadata:
    side = Path(sidecar_path(str(path)))
    try:
        return read_sidecar(side, confine=confine)
    except Exception:  # none, unreadable, refused (FIFO, device, link outside) or odd: no metadata
        return Metadata()


def _short(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split())
    if len(text) < 12:  # "0", "'S'": the exception type says more than such a message
        text = f"{type(exc).__name__} {text}".strip()
    return text if len(text) <= 160 else text[:157] + "..."


__all__ = ["Header", "read_micrograph", "sniff_format"]
