"""Photo intake: turn what a member uploaded into square training photos, and say plainly what happened to each file.

Torch-free (PIL, OpenCV, NumPy): the bot runs it in a thread at submit time, so a member sees the verdict before the
job is queued. Every bound is checked before anything is decoded: bytes per file, pixels per image (decompression
bombs), files per set, zip entries, unpacked size (zip bombs, whose headers may lie) and zip paths.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import UserError
from trainer.naming import check_token, class_kind, instance_prompt, normalise_class, token_warnings

__all__ = [
    "IntakeLimits", "IntakeReport", "PreparedPhoto", "intake_photos",
    "check_token", "token_warnings", "normalise_class", "class_kind", "instance_prompt",
]

ACCEPTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
NEAR_DUPLICATE_BITS = 6  # of 64 in the difference hash; photos this close are the same shot
BLUR_THRESHOLD = 60.0  # variance of the Laplacian on a 512 px grey image; below this a photo looks soft
FACE_CLASSES = ("person",)  # kinds whose photos should show one face
CROP_AROUND_FACE = ("person", "animal")


@dataclass(frozen=True)
class IntakeLimits:
    min_photos: int = 3
    max_photos: int = 30
    max_photo_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_zip_entries: int = 200
    max_unpacked_bytes: int = 400 * 1024 * 1024
    min_side: int = 256
    resolution: int = 512


@dataclass
class PreparedPhoto:
    source: str
    image: Image.Image
    caption: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class IntakeReport:
    accepted: list[PreparedPhoto] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    limits: IntakeLimits = field(default_factory=IntakeLimits)

    @property
    def ok(self) -> bool:
        return len(self.accepted) >= self.limits.min_photos

    def summary(self) -> str:
        """A few lines a member reads: how many photos are used, and why any were left out."""
        lines = [f"{len(self.accepted)} photo{'s' if len(self.accepted) != 1 else ''} accepted"
                 + (f", {len(self.rejected)} left out" if self.rejected else "") + "."]
        lines += [f"✗ {name}: {reason}" for name, reason in self.rejected]
        by_warning: dict[str, list[str]] = {}
        for photo in self.accepted:
            for warning in photo.warnings:
                by_warning.setdefault(warning, []).append(photo.source)
        for warning, sources in by_warning.items():
            names = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
            lines.append(f"⚠ {names}: {warning}")
        lines += [f"⚠ {w}" for w in self.warnings]
        if not self.ok:
            lines.append(f"At least {self.limits.min_photos} usable photos are needed; please send more "
                         "(clear JPEG, PNG or WebP photos, each at least "
                         f"{self.limits.min_side} px on the shorter side).")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike, **_ignored) -> list[Path]:
        """Write the accepted photos as NNN.png (+ NNN.txt captions), each to a temp name then renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for number, photo in enumerate(self.accepted):
            target = directory / f"{number:03d}.png"
            _write_atomic(target, lambda f, im=photo.image: im.save(f, "PNG"))
            written.append(target)
            if photo.caption:
                _write_atomic(target.with_suffix(".txt"), lambda f, c=photo.caption: f.write(c.encode("utf-8")))
        return written

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "accepted": [{"source": p.source, "caption": p.caption, "warnings": p.warnings} for p in self.accepted],
            "rejected": [{"source": name, "reason": reason} for name, reason in self.rejected],
            "warnings": list(self.warnings),
        }


def intake_photos(files, out_dir: str | os.PathLike | None = None, *, limits: IntakeLimits | None = None,
                  class_name: str = "person", style: bool = False) -> IntakeReport:
    """Check and prepare `files` (a list of (name, bytes) pairs or paths; a .zip among them is unpacked).

    Returns the report; when `out_dir` is given the accepted photos are also written there.
    """
    limits = limits or IntakeLimits()
    report = IntakeReport(limits=limits)
    kind = "style" if style else class_kind(class_name)
    captions: dict[str, str] = {}
    candidates: list[tuple[str, bytes]] = []
    for name, data in _read_sources(files, limits, report):
        if _looks_like_zip(data):
            _unpack_zip(name, data, limits, report, candidates, captions)
        else:
            candidates.append((name, data))

    if len(candidates) > limits.max_photos:
        for name, _ in candidates[limits.max_photos:]:
            report.rejected.append((name, f"more than {limits.max_photos} photos were sent; only the first "
                                          f"{limits.max_photos} are used"))
        candidates = candidates[:limits.max_photos]

    seen_exact: dict[str, str] = {}
    seen_hashes: list[tuple[int, str]] = []
    for name, data in candidates:
        try:
            image, notes = _decode(name, data, limits)
        except _Rejected as why:
            report.rejected.append((name, str(why)))
            continue
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in seen_exact:
            report.rejected.append((name, f"is the same photo as {seen_exact[digest]}"))
            continue
        fingerprint = _difference_hash(image)
        twin = next((other for h, other in seen_hashes if bin(h ^ fingerprint).count("1") <= NEAR_DUPLICATE_BITS), None)
        if twin is not None:
            report.rejected.append((name, f"looks like a copy of {twin}; only one is used"))
            continue
        seen_exact[digest] = name
        seen_hashes.append((fingerprint, name))
        if _sharpness(image) < BLUR_THRESHOLD:
            notes.append("looks blurry; sharp photos train better")
        square = _square_crop(image, kind, notes)
        square = square.resize((limits.resolution, limits.resolution), Image.Resampling.LANCZOS)
        report.accepted.append(PreparedPhoto(name, square, captions.get(PurePosixPath(name).stem), notes))

    if report.accepted and len(report.accepted) < 5 and report.ok:
        report.warnings.append("5 to 20 varied photos (different days, light and angles) give the best results")
    if out_dir is not None and report.accepted:
        report.save(out_dir)
    return report


class _Rejected(Exception):
    pass


def _read_sources(files, limits: IntakeLimits, report: IntakeReport):
    """Yield (name, bytes) for each input, refusing oversized files before reading them."""
    zip_limit = limits.max_unpacked_bytes
    for item in files:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            name = path.name
            size = path.stat().st_size
            limit = zip_limit if path.suffix.lower() == ".zip" else limits.max_photo_bytes
            if size > limit:
                report.rejected.append((name, f"is {_mb(size)}; the most is {_mb(limit)} per file"))
                continue
            data = path.read_bytes()
        else:
            name, data = item
            name = PurePosixPath(str(name).replace("\\", "/")).name or "unnamed"
            limit = zip_limit if _looks_like_zip(data) else limits.max_photo_bytes
            if len(data) > limit:
                report.rejected.append((name, f"is {_mb(len(data))}; the most is {_mb(limit)} per file"))
                continue
        yield name, data


def _looks_like_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _unpack_zip(zip_name: str, data: bytes, limits: IntakeLimits, report: IntakeReport,
                candidates: list[tuple[str, bytes]], captions: dict[str, str]) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        report.rejected.append((zip_name, "is a damaged zip file; zip the photos again and resend"))
        return
    files = [e for e in entries if not e.is_dir()]
    if len(files) > limits.max_zip_entries:
        report.rejected.append((zip_name, f"holds {len(files)} files; the most is {limits.max_zip_entries}"))
        return
    declared = sum(e.file_size for e in files)
    if declared > limits.max_unpacked_bytes:
        report.rejected.append((zip_name, f"unpacks to {_mb(declared)}; the most is {_mb(limits.max_unpacked_bytes)}"))
        return
    unpacked = 0
    for entry in files:
        name = entry.filename
        label = f"{zip_name}/{name}"
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            report.rejected.append((label, "has a path that points outside the zip; it was not unpacked"))
            continue
        if stat.S_ISLNK(entry.external_attr >> 16):
            report.rejected.append((label, "is a link, not a photo; it was not unpacked"))
            continue
        base = PurePosixPath(*parts)
        if base.name.startswith(".") or "__MACOSX" in parts:
            continue  # macOS and editor leftovers, not photos
        if entry.file_size > limits.max_photo_bytes:
            report.rejected.append((label, f"is {_mb(entry.file_size)}; the most is {_mb(limits.max_photo_bytes)} per file"))
            continue
        try:
            content = _read_entry(archive, entry, limits.max_photo_bytes)
        except _Rejected as why:
            report.rejected.append((label, str(why)))
            continue
        unpacked += len(content)
        if unpacked > limits.max_unpacked_bytes:
            report.rejected.append((zip_name, f"unpacks to more than {_mb(limits.max_unpacked_bytes)}; the rest was skipped"))
            return
        if base.suffix.lower() == ".txt":
            captions[base.stem] = content.decode("utf-8", errors="replace").strip()[:500]
        elif _looks_like_zip(content):
            report.rejected.append((label, "is a zip inside the zip; put the photos in one zip"))
        else:
            candidates.append((str(base), content))


def _read_entry(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> bytes:
    """Read at most `limit` bytes, whatever the header claims: a lying zip bomb is cut off, not unpacked."""
    chunks, total = [], 0
    try:
        with archive.open(entry) as stream:
            while chunk := stream.read(1 << 16):
                total += len(chunk)
                if total > limit:
                    raise _Rejected(f"unpacks to more than {_mb(limit)}; it was not used")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
        if isinstance(error, RuntimeError) and "encrypted" in str(error):
            raise _Rejected("is password-protected; zip the photos without a password") from None
        raise _Rejected("could not be unpacked (the zip is damaged)") from None
    return b"".join(chunks)


def _decode(name: str, data: bytes, limits: IntakeLimits) -> tuple[Image.Image, list[str]]:
    """Check the header (format, pixel count), then decode to an upright RGB image."""
    if not data:
        raise _Rejected("is an empty file")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc"):
        raise _Rejected("is a HEIC photo, which isn't supported; export it as JPEG (on iPhone: Settings → Camera → "
                        "Formats → Most Compatible)")
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _Rejected(f"claims an enormous size; the most is {limits.max_pixels // 1_000_000} megapixels") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise _Rejected("is not a photo this bot can read; send JPEG, PNG or WebP") from None
        kind = ACCEPTED_FORMATS.get(image.format or "")
        if kind is None:
            raise _Rejected(f"is a {image.format} file; send JPEG, PNG or WebP")
        width, height = image.size
        if width * height > limits.max_pixels:
            raise _Rejected(f"is {width}×{height} pixels; the most is {limits.max_pixels // 1_000_000} megapixels")
        if min(width, height) < limits.min_side:
            raise _Rejected(f"is too small ({width}×{height}); photos need at least {limits.min_side} px on the "
                            "shorter side")
        if getattr(image, "n_frames", 1) > 1:
            notes.append("is animated; only its first frame is used")
            image.seek(0)
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _Rejected(f"is larger than {limits.max_pixels // 1_000_000} megapixels when opened") from None
        except (OSError, ValueError, SyntaxError, EOFError):
            raise _Rejected("is damaged or incomplete; send the original photo again") from None
    return _to_rgb(upright), notes


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency becomes white, 16-bit and float images are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _difference_hash(image: Image.Image) -> int:
    """64-bit dHash: which neighbour is brighter on a 9×8 grey thumbnail. Survives re-encoding and resizing."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _grey_for_analysis(image: Image.Image, side: int = 512) -> np.ndarray:
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR))


def _sharpness(image: Image.Image) -> float:
    import cv2

    return float(cv2.Laplacian(_grey_for_analysis(image), cv2.CV_64F).var())


@functools.lru_cache(maxsize=1)
def _face_detector():
    import cv2

    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))


def _faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in the image's own pixels, from OpenCV's bundled frontal-face detector."""
    import cv2

    grey = _grey_for_analysis(image)
    # Faces in a training photo are large; a small minimum size lets texture pass for faces.
    smallest = max(40, min(grey.shape) // 7)
    found = _face_detector().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=6, minSize=(smallest, smallest))
    scale = max(image.size) / max(grey.shape)
    return [tuple(int(round(v * scale)) for v in box) for box in found]


def crop_box_around(size: tuple[int, int], face: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """The largest square inside `size`, centred on the face box where one is given, else on the image centre."""
    width, height = size
    side = min(width, height)
    if face is None:
        cx, cy = width / 2, height / 2
    else:
        x, y, w, h = face
        cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def _square_crop(image: Image.Image, kind: str, notes: list[str]) -> Image.Image:
    face = None
    if kind in CROP_AROUND_FACE:
        faces = _faces(image)
        if faces:
            face = max(faces, key=lambda box: box[2] * box[3])
        if kind in FACE_CLASSES:
            if not faces:
                notes.append("no face found; it was centre-cropped, so check the person is in the middle")
            elif len(faces) > 1:
                notes.append(f"{len(faces)} faces found; the largest was used; photos of just one person work best")
    return image.crop(crop_box_around(image.size, face))


def _write_atomic(target: Path, write) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, target)


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1024 * 1024 else f"{max(1, size // 1024)} KB"
