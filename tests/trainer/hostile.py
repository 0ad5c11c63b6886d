"""A corpus of hostile uploads, written to a folder in a few seconds and a few MB: small files that decode, unpack or
parse into gigabytes, and headers that lie. Used by tests/bot/test_intake_memory.py and `python -m
bench.intake_memory`.

`python -m tests.trainer.hostile DIR [--full]` writes it; `write_corpus_in_child` runs that in a process of its
own, so building the corpus (one case needs a 39-megapixel image to encode) never shows in the RSS of the process
that measures. Every file is built by hand or streamed (zlib.compressobj), never as a whole image in memory, except
that JPEG.
"""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tests.trainer.photos import make_photo_set

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Hostile:
    name: str  # the file name the member would have sent
    expect: str | None  # words the refusal must contain; None: accepted, safely
    what: str  # one line for the benchmark's table


CASES = [
    Hostile("deep16.png", None, "16-bit grey PNG, 6300×6300 (40 MP; 80 KB on disk)"),
    Hostile("wide.jpg", None, "JPEG 65000×600 (39 MP, draft cannot shrink it)"),
    Hostile("black.png", None, "PNG bomb: 8-bit RGB 6000×6000 of zeros (36 MP)"),
    Hostile("alpha.png", "once opened", "PNG bomb: RGBA 6000×6000 of zeros (144 MB decoded)"),
    Hostile("claims.png", "enormous", "PNG header claiming 30000×30000"),
    Hostile("claims.jpg", "enormous", "JPEG header claiming 60000×60000"),
    Hostile("huge.gif", "enormous", "GIF header claiming 65535×65535"),
    Hostile("huge.webp", "9000×9000 pixels", "WebP header claiming 9000×9000"),
    Hostile("huge.tiff", "enormous", "TIFF header claiming 100000×100000"),
    Hostile("million.zip", "list of contents", "zip64: 1,000,000 entries, end records claim 1"),
    Hostile("lying-count.zip", "holds 300 files", "zip: 300 entries, end record claims 1"),
    Hostile("bomb.zip", "the most is 20.0 MB per file", "zip: one entry inflating to 200 MB (0.2 MB packed)"),
    Hostile("lying-bomb.zip", "could not be unpacked", "zip: the same entry, headers claiming 1 KB"),
    Hostile("nested.zip", "zip inside the zip", "zip holding a zip of photos"),
    Hostile("tiny-entries.zip", "more than 30 photos", "zip: 200 one-byte entries"),
]


def write_corpus(directory: Path, *, full: bool = False) -> list[tuple[Hostile, Path]]:
    """Write every case to `directory`. `full`: the million-entry zip at its real size (47 MB of directory);
    otherwise 100,000 entries (4.7 MB), which every check treats the same way."""
    directory.mkdir(parents=True, exist_ok=True)
    builders = {
        "deep16.png": lambda path: png_streamed(path, 6300, 6300, 16, 0, lambda y: struct.pack(">H", y * 10) * 6300),
        "wide.jpg": _wide_jpeg,
        "black.png": lambda path: png_streamed(path, 6000, 6000, 8, 2, lambda y: bytes(18000)),
        "alpha.png": lambda path: png_streamed(path, 6000, 6000, 8, 6, lambda y: bytes(24000)),
        "claims.png": lambda path: png_streamed(path, 30000, 30000, 8, 2, None),
        "claims.jpg": _claiming_jpeg,
        "huge.gif": _huge_gif,
        "huge.webp": _huge_webp,
        "huge.tiff": _huge_tiff,
        "million.zip": lambda path: many_entries_zip(path, 1_000_000 if full else 100_000, claimed=1, zip64=True),
        "lying-count.zip": lambda path: many_entries_zip(path, 300, claimed=1, zip64=False),
        "bomb.zip": lambda path: _bomb_zip(path, claimed=None),
        "lying-bomb.zip": lambda path: _bomb_zip(path, claimed=1000),
        "nested.zip": _nested_zip,
        "tiny-entries.zip": lambda path: path.write_bytes(_zip([(f"{i:03d}.png", b"x") for i in range(200)])),
    }
    written = []
    for case in CASES:
        path = directory / case.name
        builders[case.name](path)
        written.append((case, path))
    return written


def write_corpus_in_child(directory: Path, *, full: bool = False) -> list[tuple[Hostile, Path]]:
    subprocess.run([sys.executable, "-m", "tests.trainer.hostile", str(directory)] + (["--full"] if full else []),
                   check=True, cwd=REPO_ROOT)
    return [(case, directory / case.name) for case in CASES]


def good_photos(count: int) -> list[tuple[str, bytes]]:
    """Ordinary distinct photos (PNG, 320 px), for a set that is accepted."""
    return [(f"good{i}.png", data) for i, (_, data) in enumerate(make_photo_set(count, first_seed=200))]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_streamed(path: Path, width: int, height: int, depth: int, colour: int, row) -> None:
    """A PNG streamed row by row (row(y) → that row's samples); row=None: a header and a few bytes of data."""
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)))
        packer = zlib.compressobj(9)
        for y in range(height if row is not None else 0):
            if packed := packer.compress(b"\0" + row(y)):
                out.write(_chunk(b"IDAT", packed))
        out.write(_chunk(b"IDAT", packer.flush() if row is not None else zlib.compress(b"\0" * 64)))
        out.write(_chunk(b"IEND", b""))


def _wide_jpeg(path: Path) -> None:
    from PIL import Image

    strip = Image.linear_gradient("L").resize((650, 600)).convert("RGB")
    image = Image.new("RGB", (65000, 600))
    for x in range(0, 65000, 650):
        image.paste(strip, (x, 0))
    image.save(path, "JPEG", quality=70)


def _claiming_jpeg(path: Path) -> None:
    """A small real JPEG whose frame header (SOF0) says 60000×60000."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(out, "JPEG")
    data = out.getvalue()
    sof = data.index(b"\xff\xc0")
    path.write_bytes(data[:sof + 5] + struct.pack(">HH", 60000, 60000) + data[sof + 9:])


def _huge_gif(path: Path) -> None:
    screen = struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    path.write_bytes(b"GIF89a" + screen + frame + b"\x3b")


def _huge_webp(path: Path) -> None:
    """A real lossless WebP of 16×16 whose header (VP8L) says 9000×9000."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(out, "WEBP", lossless=True)
    data = out.getvalue()
    at = data.index(b"VP8L") + 9  # after the chunk size and the VP8L signature byte: 14-bit width-1, height-1
    flags = struct.unpack_from("<I", data, at)[0] & ~((1 << 28) - 1)
    path.write_bytes(data[:at] + struct.pack("<I", flags | (9000 - 1) | (9000 - 1) << 14) + data[at + 4:])


def _huge_tiff(path: Path) -> None:
    entries = [(256, 4, 100000), (257, 4, 100000), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 200),
               (277, 3, 1), (278, 4, 100000), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + b"\0\0\0\0"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * (216 - 8 - len(ifd)))


def many_entries_zip(path: Path, count: int, *, claimed: int, zip64: bool) -> None:
    """A central directory of `count` empty stored entries (no local files needed to list them), whose end record
    (and zip64 end record) claim `claimed` entries."""
    local = b"PK\x03\x04" + struct.pack("<5H3L2H", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = b"PK\x01\x02" + struct.pack("<6H3L5H2L", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory_size = len(entry) * count
    with path.open("wb") as out:
        out.write(local)
        for _ in range(count // 10_000):
            out.write(entry * 10_000)
        out.write(entry * (count % 10_000))
        offset = len(local)
        if zip64:
            record_at = offset + directory_size
            out.write(b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, claimed, claimed, directory_size,
                                                   offset))
            out.write(b"PK\x06\x07" + struct.pack("<IQI", 0, record_at, 1))
            out.write(b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            out.write(b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, claimed, claimed, directory_size, offset, 0))


def _bomb_zip(path: Path, *, claimed: int | None) -> None:
    """One entry of 200 MB of zeros, deflated to ~0.2 MB, streamed; `claimed`: the size its headers give."""
    size = 200 * 1024 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    packed = b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(block, crc)
    stated = size if claimed is None else claimed
    name = b"bomb.png"
    local = b"PK\x03\x04" + struct.pack("<5H3L2H", 20, 0, 8, 0, 0, crc, len(packed), stated, len(name), 0) + name
    entry = b"PK\x01\x02" + struct.pack("<6H3L5H2L", 20, 20, 0, 8, 0, 0, crc, len(packed), stated, len(name), 0, 0,
                                        0, 0, 0, 0) + name
    end = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 1, 1, len(entry), len(local) + len(packed), 0)
    path.write_bytes(local + packed + entry + end)


def _nested_zip(path: Path) -> None:
    inner = _zip(good_photos(3))
    path.write_bytes(_zip([("photos.zip", inner)]))


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]), full="--full" in sys.argv[2:])
