"""Bad input never crashes and never hangs: each gives one clear line, quickly, and exit status 1."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile

from conftest import Cli
from semwatch.config import Settings, load_settings
from semwatch.errors import ExitStatus
from semwatch.reading.micrograph import read_micrograph
from semwatch.reading.sidecar import read_sidecar
from semwatch.safefs import UNCONFINED, Confinement
from semwatch.values import MicrographError
from test_safefs import call_within


def _image(height: int = 120, width: int = 160) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((height, width)) * 200 + 20).astype(np.uint8)


def _encoded(ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, _image())
    assert ok
    return buf.tobytes()


def _tiff_bytes(tmp: Path) -> bytes:
    tifffile.imwrite(tmp / "src.tif", _image())
    return (tmp / "src.tif").read_bytes()


def _huge_tiff(width: int, height: int) -> bytes:
    """A minimal little-endian TIFF whose header claims width×height 8-bit pixels (data: 8 bytes)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, min(width * height, 2**32 - 1))]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HHI", tag, typ, count)
        packed += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 16) + b"\x00" * 8 + ifd


def _huge_jpeg() -> bytes:
    """A real JPEG whose frame header is patched to 60000×60000."""
    data = bytearray(_encoded(".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def _huge_png() -> bytes:
    data = bytearray(_encoded(".png"))
    data[16:24] = struct.pack(">II", 100000, 100000)
    return bytes(data)


def _huge_bmp() -> bytes:
    data = bytearray(_encoded(".bmp"))
    data[18:26] = struct.pack("<ii", 100000, 100000)
    return bytes(data)


def _cut(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def _random(n: int = 50_000, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# name, file contents (from a tmp folder), a word the error message must contain
CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("empty.tif", lambda t: b"", "empty"),
    ("empty.jpg", lambda t: b"", "empty"),
    ("truncated.tif", lambda t: _cut(_tiff_bytes(t)), "truncated"),
    ("truncated_header.tif", lambda t: _tiff_bytes(t)[:6], "TIFF"),
    ("truncated.jpg", lambda t: _cut(_encoded(".jpg")), "truncated"),
    ("header_only.jpg", lambda t: _encoded(".jpg")[:40], "JPEG"),
    ("truncated.png", lambda t: _cut(_encoded(".png")), "truncated"),
    ("truncated.bmp", lambda t: _cut(_encoded(".bmp")), "truncated"),
    ("random.tif", lambda t: _random(), "not an image"),
    ("random.jpg", lambda t: _random(seed=2), "not an image"),
    ("random.png", lambda t: _random(seed=3), "not an image"),
    ("tiff_magic_garbage.tif", lambda t: b"II*\x00" + _random(seed=4), "TIFF"),
    ("tiff_bad_ifd.tif", lambda t: b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64, "TIFF"),
    ("jpeg_magic_garbage.jpg", lambda t: b"\xff\xd8\xff" + _random(seed=5), "JPEG"),
    ("notes.tif", lambda t: b"Just some text, not an image.\n" * 20, "not an image"),
    ("huge.tif", lambda t: _huge_tiff(100_000, 100_000), "too large"),
    ("huge.jpg", lambda t: _huge_jpeg(), "too large"),
    ("huge.png", lambda t: _huge_png(), "too large"),
    ("huge.bmp", lambda t: _huge_bmp(), "too large"),
    ("zero_size.png", lambda t: _encoded(".png")[:16] + struct.pack(">II", 0, 0) + _encoded(".png")[24:],
     "no image size"),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    folder = tmp_path / "bad"
    folder.mkdir()
    out = {}
    for name, make, word in CASES:
        path = folder / name
        path.write_bytes(make(tmp_path))
        out[name] = (path, word)
    (folder / "a folder.tif").mkdir()
    out["a folder.tif"] = (folder / "a folder.tif", "directory")
    os.mkfifo(folder / "pipe.tif")  # opening a FIFO for reading would block: must be refused first
    out["pipe.tif"] = (folder / "pipe.tif", "not a regular file: a FIFO")
    (folder / "zero.tif").symlink_to("/dev/zero")  # endless: must be refused, never read
    out["zero.tif"] = (folder / "zero.tif", "not a regular file: a character device")
    (folder / "dangling.tif").symlink_to(folder / "nowhere.tif")
    out["dangling.tif"] = (folder / "dangling.tif", "no such file")
    return out


def test_each_bad_file_gives_a_clear_error_quickly(bad_files: dict[str, tuple[Path, str]],
                                                  settings: Settings) -> None:
    for name, (path, word) in bad_files.items():
        t0 = time.perf_counter()
        with pytest.raises(MicrographError) as info:
            read_micrograph(path, settings)
        elapsed = time.perf_counter() - t0
        message = str(info.value)
        assert word.lower() in message.lower(), (name, message)
        assert "\n" not in message and len(message) < 200, (name, message)
        assert elapsed < 1.0, (name, elapsed)


def test_tiff_data_past_end_of_file(tmp_path: Path, settings: Settings) -> None:
    """A TIFF whose strip offsets point beyond the file (a copy cut short, header intact)."""
    data = bytearray(_huge_tiff(64, 64))
    (tmp_path / "short.tif").write_bytes(bytes(data))
    with pytest.raises(MicrographError, match="truncated"):
        read_micrograph(tmp_path / "short.tif", settings)


def test_tiff_with_absurd_samples_per_pixel(tmp_path: Path, settings: Settings) -> None:
    data = bytearray(_huge_tiff(64, 64))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 277:  # SamplesPerPixel
            data[entry + 8 : entry + 10] = struct.pack("<H", 60000)
    (tmp_path / "samples.tif").write_bytes(bytes(data))
    with pytest.raises(MicrographError, match="TIFF"):
        read_micrograph(tmp_path / "samples.tif", settings)


def test_file_above_max_file_mb(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_encoded(".png") + b"\x00" * 200_000)
    small = settings.replace(reading=load_settings(None, environ={}, overrides={
        "reading": {"max_file_mb": 0.1}}).reading)
    with pytest.raises(MicrographError, match="max_file_mb"):
        read_micrograph(path, small)


def test_max_pixels_setting_refuses_before_decoding(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "ok.png"
    path.write_bytes(_encoded(".png"))
    assert read_micrograph(path, settings).width == 160
    tight = settings.replace(reading=load_settings(None, environ={}, overrides={
        "reading": {"max_pixels": 160 * 120 - 1}}).reading)
    with pytest.raises(MicrographError, match="max_pixels"):
        read_micrograph(path, tight)


def test_unreadable_file(tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 does not stop root (tests run as root): inject the PermissionError instead."""
    path = tmp_path / "locked.tif"
    tifffile.imwrite(path, _image())
    real_open = os.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> int:
        if Path(os.fsdecode(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(MicrographError, match="permission denied"):
        read_micrograph(path, settings)


def test_inspect_cli_on_bad_files(bad_files: dict[str, tuple[Path, str]], vendor_dir: Path,
                                  cli: Cli) -> None:
    """The command: one `{path, error}` line per bad file, good files still reported, exit 1."""
    good = sorted(vendor_dir.glob("zeiss/*.tif"))[0]
    paths = [str(p) for p, _ in bad_files.values()] + [str(good)]
    run = cli("inspect", "--json", *paths)
    assert run.code == ExitStatus.INPUT_FAILED, run.err
    assert "Traceback" not in run.err
    lines = [json.loads(line) for line in run.out.splitlines()]
    assert [r["path"] for r in lines] == paths
    errors = {Path(r["path"]).name: r["error"] for r in lines if "error" in r}
    for name, (_path, word) in bad_files.items():
        assert word.lower() in errors[name].lower(), (name, errors.get(name))
    assert "error" not in lines[-1] and lines[-1]["databar_rows"] == 78

    table = cli("inspect", *paths[:3])
    assert table.code == ExitStatus.INPUT_FAILED and "Traceback" not in table.err
    assert "empty file" in table.out


def test_mutated_files_fail_cleanly(tmp_path: Path, settings: Settings, ncm_dir: Path,
                                    vendor_dir: Path) -> None:
    """Seeded fuzzing: bytes flipped, files cut, blocks overwritten — only MicrographError, fast."""
    rng = np.random.default_rng(7)
    sources = [_encoded(".png"), _encoded(".bmp"), _encoded(".jpg"), _tiff_bytes(tmp_path),
               sorted(vendor_dir.glob("zeiss/*.tif"))[0].read_bytes(),
               sorted(ncm_dir.glob("622/*.jpg"))[0].read_bytes()]
    path = tmp_path / "mutant.img"
    for _ in range(150):
        data = bytearray(sources[int(rng.integers(len(sources)))])
        mode = rng.random()
        if mode < 0.5:  # flip bytes, mostly in the headers
            for pos in rng.integers(0, min(len(data), 4096), int(rng.integers(1, 20))):
                data[pos] = int(rng.integers(256))
        elif mode < 0.8:
            data = data[: int(rng.integers(8, len(data)))]
        else:
            pos = int(rng.integers(len(data)))
            data[pos : pos + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        t0 = time.perf_counter()
        try:
            m = read_micrograph(path, settings)
            assert m.pixels.dtype == np.float32
        except MicrographError as exc:
            assert "\n" not in str(exc)
        assert time.perf_counter() - t0 < 2.0


# --- untrusted folder entries: FIFOs, devices, links, decompression bombs --------------------------


def _reading(settings: Settings, **values: float) -> Settings:
    return settings.replace(reading=load_settings(None, environ={}, overrides={"reading": values}).reading)


@pytest.mark.parametrize("name", ["pipe.tif", "pipe.jpg", "pipe.png"])
def test_fifo_named_as_image_fails_at_once(tmp_path: Path, settings: Settings, name: str) -> None:
    """Nobody ever writes to it: opening it for reading would block the worker for ever."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(MicrographError, match=r"^not a regular file: a FIFO \(named pipe\)$"):
        call_within(lambda: read_micrograph(fifo, settings), fifos=(fifo,))
    with pytest.raises(MicrographError, match="FIFO"):
        call_within(lambda: read_micrograph(fifo, settings, confine=Confinement(tmp_path)), fifos=(fifo,))
    assert time.perf_counter() - t0 < 1.0


def test_link_to_dev_zero_is_refused(tmp_path: Path, settings: Settings) -> None:
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with pytest.raises(MicrographError, match=r"^not a regular file: a character device$"):
        call_within(lambda: read_micrograph(link, settings))
    outside = r"^a symbolic link to a file outside the watch folder \(/dev/zero\)$"
    with pytest.raises(MicrographError, match=outside):
        call_within(lambda: read_micrograph(link, settings, confine=Confinement(tmp_path)))


def test_symlink_policy_for_images(tmp_path: Path, settings: Settings) -> None:
    watch, elsewhere = tmp_path / "watch", tmp_path / "elsewhere"
    watch.mkdir()
    elsewhere.mkdir()
    (watch / "real.png").write_bytes(_encoded(".png"))
    (elsewhere / "outside.png").write_bytes(_encoded(".png"))
    (watch / "in.png").symlink_to(watch / "real.png")
    (watch / "out.png").symlink_to(elsewhere / "outside.png")
    inside, never, always = (Confinement(watch, p) for p in ("inside", "never", "always"))

    assert read_micrograph(watch / "in.png", settings, confine=inside).width == 160
    with pytest.raises(MicrographError, match="symbolic link to a file outside the watch folder"):
        read_micrograph(watch / "out.png", settings, confine=inside)
    assert read_micrograph(watch / "real.png", settings, confine=never).width == 160
    for name in ("in.png", "out.png"):
        with pytest.raises(MicrographError, match="symbolic link"):
            read_micrograph(watch / name, settings, confine=never)
        assert read_micrograph(watch / name, settings, confine=always).width == 160
        assert read_micrograph(watch / name, settings).width == 160  # UNCONFINED: the command line


@pytest.fixture
def sne_copy(ncm_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A real SNE JPEG copied into a fresh folder, and its real sidecar kept aside."""
    source = ncm_dir / "622" / "ETRI_ 20 kV_SE_HighVac_x500 __1550.jpg"
    folder = tmp_path / "watch"
    folder.mkdir()
    image = folder / source.name
    image.write_bytes(source.read_bytes())
    return image, Path(str(source) + ".txt")


def test_real_sidecar_read_when_confined(sne_copy: tuple[Path, Path], settings: Settings) -> None:
    image, real_side = sne_copy
    side = Path(str(image) + ".txt")
    side.write_bytes(real_side.read_bytes())

    def vendor(confine: Confinement = UNCONFINED) -> str | None:
        return read_micrograph(image, settings, confine=confine).metadata.vendor

    assert vendor(Confinement(image.parent)) == "SEC"
    side.unlink()
    side.symlink_to(real_side)  # a link out of the watch folder: followed only where allowed
    assert vendor(Confinement(image.parent)) is None
    assert vendor(Confinement(image.parent, "never")) is None
    assert vendor(Confinement(image.parent, "always")) == "SEC"
    assert vendor() == "SEC"


@pytest.mark.parametrize("kind", ["fifo", "zero", "huge"])
def test_hostile_sidecar_costs_only_the_metadata(sne_copy: tuple[Path, Path], settings: Settings,
                                                 kind: str) -> None:
    """The sidecar's name is opened without a look first (no check-then-open race): the safe open
    itself refuses at once, without blocking or filling memory."""
    image, _ = sne_copy
    side = Path(str(image) + ".txt")
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "zero":
        side.symlink_to("/dev/zero")
    else:
        side.write_bytes(b"[Image Info]\r\nModel : SNE\r\n" + b"x" * 10_000_000)
    fifos = (side,) if kind == "fifo" else ()
    t0 = time.perf_counter()
    m = call_within(lambda: read_micrograph(image, settings), fifos=fifos)
    assert m.width == 1280 and m.metadata.vendor is None and m.metadata.magnification is None
    with pytest.raises(OSError):
        call_within(lambda: read_sidecar(side), fifos=fifos)
    assert time.perf_counter() - t0 < 2.0


def _float64_bomb(path: Path, side: int = 5000, samples: int = 8) -> None:
    """A side×side×8 float64 TIFF (1.6 GB decoded) whose zlib tiles of zeros make a ~1.6 MB file.
    Every tile is the same, so it is compressed once and tifffile writes the encoded bytes."""
    tile = zlib.compress(np.zeros((256, 256, samples), np.float64).tobytes())
    count = (-(-side // 256)) ** 2
    tifffile.imwrite(path, (tile for _ in range(count)), shape=(side, side, samples), dtype=np.float64,
                     tile=(256, 256), compression="zlib", photometric="minisblack", planarconfig="contig")


def test_float64_decompression_bomb_refused_from_the_header(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "bomb.tif"
    _float64_bomb(path)
    assert path.stat().st_size < 2_000_000
    with tifffile.TiffFile(path) as tif:  # what tifffile would decode: 1.6 GB
        assert tif.pages.first.nbytes == 5000 * 5000 * 8 * 8
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MicrographError) as info:
            read_micrograph(path, settings)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == ("image too large to decode: 1526 MB decoded "
                               "(> [reading] max_decoded_mb 1024)")
    assert elapsed < 1.0, elapsed
    assert peak < 20 * 1024 * 1024, peak  # numpy's allocations are traced too: nothing was decoded


def test_decoded_size_counts_samples_bit_depth_and_planes(tmp_path: Path, settings: Settings) -> None:
    """width × height × samples × bytes per sample × planes, for each format, as the decoder makes it:
    read at exactly that limit, refused one byte below it."""
    rng = np.random.default_rng(5)
    rgba16 = rng.integers(0, 65535, (100, 120, 4), dtype=np.uint16)
    ok, png = cv2.imencode(".png", rgba16)
    assert ok
    (tmp_path / "rgba16.png").write_bytes(png.tobytes())
    cv2.imwrite(str(tmp_path / "rgb.jpg"), rng.integers(0, 255, (100, 120, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "grey.jpg"), _image(100, 120))
    cv2.imwrite(str(tmp_path / "grey.bmp"), _image(100, 120))  # 8-bit palette: expanded to BGR
    planes = rng.integers(0, 255, (3, 100, 120), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    volume = rng.integers(0, 65535, (5, 100, 128), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "volume.tif", volume, tile=(5, 16, 16), volumetric=True)
    tifffile.imwrite(tmp_path / "f32.tif", rng.random((100, 120), dtype=np.float32))
    expected = {"rgba16.png": 100 * 120 * 8, "rgb.jpg": 100 * 120 * 3, "grey.jpg": 100 * 120,
                "grey.bmp": 100 * 120 * 3, "planar.tif": 100 * 120 * 3, "volume.tif": 5 * 100 * 128 * 2,
                "f32.tif": 100 * 120 * 4}
    for name, nbytes in expected.items():
        read_micrograph(tmp_path / name, settings)  # within the default limit: read as before
        with pytest.raises(MicrographError, match="too large to decode"):
            read_micrograph(tmp_path / name, _reading(settings, max_decoded_mb=(nbytes - 1) / 1048576))
        read_micrograph(tmp_path / name, _reading(settings, max_decoded_mb=nbytes / 1048576))
