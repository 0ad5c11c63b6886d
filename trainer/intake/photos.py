"""Photo intake: turn what a member uploaded into square training photos, and say plainly what happened to each file.

Torch-free (PIL, OpenCV, NumPy): at submit time the bot runs it in a child process under an address-space limit
(trainer/intake/isolated.py), so a member sees the verdict before the job is queued and no upload can grow the bot.
Every bound is checked before anything is decoded: bytes per file, pixels per image and decoded bytes (pixels ×
channels × bytes per sample: decompression bombs), files per set, the zip's central directory (its size and true
entry count), unpacked size (zip bombs, whose headers may lie) and zip paths (trainer/intake/zips.py). One photo is
read and decoded at a time; big ones are reduced by a whole factor (JPEGs while decoding) to a few megapixels before
the checks, and 16-bit ones are scaled a strip at a time. Faces are found with OpenCV's Haar detectors
(trainer/intake/faces.py).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from trainer.contract.files import write_atomic, write_text_atomic
from trainer.intake.zips import EntryRefused
from trainer.intake.faces import CAT, HUMAN, crop_box_around, find_faces, grey_for_analysis
from trainer.intake.zips import looks_like_zip, mb, unpack_zip
from trainer.contract.naming import class_kind, instance_prompt, normalise_class

__all__ = [
    "IntakeLimits", "IntakeReport", "PreparedPhoto", "intake_photos", "crop_box_around",
    "normalise_class", "class_kind", "instance_prompt",
]

ACCEPTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
NEAR_DUPLICATE_BITS = 6  # of 64 in the difference hash; photos this close are the same shot
BLUR_THRESHOLD = 60.0  # variance of the Laplacian on a 512 px grey image; below this a photo looks soft
CAT_CLASSES = ("cat", "kitten")
CAPTION_CHARS = 500
SUMMARY_CHARS = 1900  # a Discord message holds 2000
STRIP_PIXELS = 1 << 20  # 16-bit photos are converted this many pixels at a time (8 MB of 64-bit numbers)


@dataclass(frozen=True)
class IntakeLimits:
    min_photos: int = 3
    max_photos: int = 30
    max_photo_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Decoded size (pixels × channels × bytes per sample): 40 megapixels of 8-bit RGB or 16-bit grey fit.
    max_decoded_bytes: int = 128 * 1024 * 1024
    max_zip_entries: int = 200
    max_unpacked_bytes: int = 400 * 1024 * 1024
    min_side: int = 256
    resolution: int = 512


@dataclass
class PreparedPhoto:
    source: str
    image: Image.Image | None  # RGB, resolution × resolution; None in a report read back from the intake process
    caption: str | None = None
    warnings: list[str] = field(default_factory=list)
    # The face the crop was centred on (x, y, w, h), in the pixels of the decoded upright photo; big JPEGs are
    # decoded at 1/2, 1/4 or 1/8 scale (other formats reduced alike), so this is not always the original's resolution.
    face: tuple[int, int, int, int] | None = None
    path: Path | None = None  # where it was saved as NNN.png, when it was


@dataclass
class IntakeReport:
    accepted: list[PreparedPhoto] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason in plain words)
    warnings: list[str] = field(default_factory=list)  # about the whole set
    limits: IntakeLimits = field(default_factory=IntakeLimits)
    notes: list[str] = field(default_factory=list)  # for information: nothing the member needs to fix
    contact_sheet: bytes | None = None  # JPEG thumbnails of the accepted photos, when made (by the intake process)

    @property
    def ok(self) -> bool:
        return len(self.accepted) >= self.limits.min_photos

    def summary(self) -> str:
        """A few lines a member reads (under 2000 characters): photos used, why any were left out, what to check."""
        count = len(self.accepted)
        lines = [f"{count} photo{'s' if count != 1 else ''} accepted"
                 + (f", {len(self.rejected)} left out" if self.rejected else "") + "."]
        lines += [f"✗ {names}: {reason}" for reason, names in _grouped((r, n) for n, r in self.rejected)]
        per_photo = ((w, p.source) for p in self.accepted for w in p.warnings)
        lines += [f"⚠ {names}: {warning}" for warning, names in _grouped(per_photo)]
        lines += [f"⚠ {w}" for w in self.warnings]
        lines += [f"ℹ {n}" for n in self.notes]
        if not self.ok:
            lines.append(f"At least {self.limits.min_photos} usable photos are needed; please send more "
                         "(clear JPEG, PNG or WebP photos, each at least "
                         f"{self.limits.min_side} px on the shorter side).")
        return _fit(lines, SUMMARY_CHARS)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the accepted photos as NNN.png (+ NNN.txt captions), each to a temp name then renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for number, photo in enumerate(self.accepted):
            target = directory / f"{number:03d}.png"
            if photo.image is None:  # decoded by the intake process, which saved it
                write_atomic(target, functools.partial(shutil.copyfile, photo.path))
            else:
                write_atomic(target, lambda tmp: photo.image.save(tmp, "PNG"))
                photo.path = target
            written.append(target)
            if photo.caption:
                write_text_atomic(target.with_suffix(".txt"), photo.caption)
        return written

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "accepted": [{"source": p.source, "caption": p.caption, "warnings": list(p.warnings),
                          "face": list(p.face) if p.face else None} for p in self.accepted],
            "rejected": [{"source": name, "reason": reason} for name, reason in self.rejected],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict, limits: IntakeLimits, photos_dir: Path) -> IntakeReport:
        """The report `to_dict` wrote, with the photos it saved as NNN.png in `photos_dir` (not loaded)."""
        accepted = [PreparedPhoto(p["source"], None, p["caption"], list(p["warnings"]),
                                  tuple(p["face"]) if p["face"] else None, photos_dir / f"{number:03d}.png")
                    for number, p in enumerate(data["accepted"])]
        return cls(accepted=accepted, rejected=[(r["source"], r["reason"]) for r in data["rejected"]],
                   warnings=list(data["warnings"]), limits=limits, notes=list(data["notes"]))


def intake_photos(files, out_dir: str | os.PathLike | None = None, *, limits: IntakeLimits | None = None,
                  class_name: str = "person", style: bool = False) -> IntakeReport:
    """Check and prepare `files`: (name, bytes) pairs or paths (a folder is read one level deep; a .zip is unpacked).

    `name.txt` beside `name.jpg` (in the zip or among the files) is that photo's caption. Returns the report; when
    `out_dir` is given the accepted photos are also written there as NNN.png (+ NNN.txt).
    """
    limits = limits or IntakeLimits()
    report = IntakeReport(limits=limits)
    kind = "style" if style else class_kind(class_name)
    detector = CAT if class_name in CAT_CLASSES else HUMAN if kind == "person" else None

    with contextlib.ExitStack() as open_zips:
        candidates, texts = _list_inputs(files, limits, report, open_zips)
        _prepare(candidates, texts, limits, report, kind, detector)
    if report.accepted and len(report.accepted) < 5 and report.ok:
        report.warnings.append("5 to 20 varied photos (different days, light and angles) give the best results")
    if out_dir is not None and report.accepted:
        report.save(out_dir)
    return report


def _list_inputs(files, limits: IntakeLimits, report: IntakeReport, open_zips: contextlib.ExitStack):
    """(name, read) for each photo candidate and caption, nothing decoded yet and zip entries not yet inflated."""
    texts: dict[str, tuple[str, _Read]] = {}
    candidates: list[tuple[str, _Read]] = []
    unpack_budget = limits.max_unpacked_bytes  # for the whole request: several small zip bombs add up
    for name, source in _read_sources(files, limits, report):
        if looks_like_zip(_head(source)):
            if PurePosixPath(name).suffix.lower() != ".zip":
                report.rejected.append((name, "is not a photo (it is a zip file under another name)"))
                continue
            unpacked, archive = unpack_zip(name, source, max_entries=limits.max_zip_entries,
                                           max_file_bytes=limits.max_photo_bytes,
                                           max_total_bytes=max(0, unpack_budget))
            if archive is not None:
                open_zips.callback(archive.close)
            report.rejected += unpacked.rejected
            entries = [(entry, _labelled(read, f"{name}/{entry}")) for entry, read in unpacked.files]
            unpack_budget -= unpacked.declared_bytes
        else:
            entries = [(name, functools.partial(_read_file, source))]
        for entry_name, read in entries:
            if PurePosixPath(entry_name).suffix.lower() == ".txt":
                texts[_stem_key(entry_name)] = (entry_name, read)
            else:
                candidates.append((entry_name, read))

    if len(candidates) > limits.max_photos:
        for name, _ in candidates[limits.max_photos:]:
            report.rejected.append((name, f"more than {limits.max_photos} photos were sent; only the first "
                                          f"{limits.max_photos} are used"))
        candidates = candidates[:limits.max_photos]
    return candidates, texts


def _prepare(candidates, texts, limits: IntakeLimits, report: IntakeReport, kind: str, detector) -> None:
    """Decode, de-duplicate, check and crop each candidate, one at a time (only one upload is in memory at once)."""
    seen_exact: dict[str, str] = {}
    seen_hashes: list[tuple[int, str]] = []
    faces_unavailable = False
    for name, read in candidates:
        try:
            image, notes = _decode(read(), limits)
        except _Rejected as why:
            report.rejected.append((why.label or name, str(why)))
            continue
        except MemoryError:  # the intake process runs under an address-space limit; the photo's memory is freed now
            report.rejected.append((name, "is too large to process; send a smaller photo (an ordinary JPEG)"))
            continue
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in seen_exact:
            report.rejected.append((name, f"is the same photo as {_code(seen_exact[digest])}"))
            continue
        fingerprint = _difference_hash(image)
        twin = next((other for h, other in seen_hashes if (h ^ fingerprint).bit_count() <= NEAR_DUPLICATE_BITS), None)
        if twin is not None:
            report.rejected.append((name, f"looks like a copy of {_code(twin)}; only one is used"))
            continue
        seen_exact[digest] = name
        seen_hashes.append((fingerprint, name))
        if _sharpness(image) < BLUR_THRESHOLD:
            notes.append("looks blurry; sharp photos train better")
        face = None
        if detector is not None:
            faces = find_faces(image, detector)
            if faces is None:
                faces_unavailable = True
            elif faces:
                face = faces[0]
            if faces is not None and kind == "person":
                if not faces:
                    notes.append("no face found; it was centre-cropped, so check the person is in the middle")
                elif len(faces) > 1:
                    notes.append(f"{len(faces)} faces found; the largest was used; photos of just one person work "
                                 "best")
        square = image.resize((limits.resolution, limits.resolution), Image.Resampling.LANCZOS,
                              box=crop_box_around(image.size, face))
        caption = _caption(texts.pop(_stem_key(name), None))
        report.accepted.append(PreparedPhoto(name, square, caption, notes, face))

    if faces_unavailable:
        report.notes.append("Faces could not be looked for on this bot, so every photo was cropped around its "
                            "middle; make sure your subject is in the centre of each photo.")
    for entry_name, _ in texts.values():
        report.notes.append(f"{_code(entry_name)} was read as a caption but no photo has the same name, so it was "
                            "not used.")


class _Rejected(Exception):
    def __init__(self, reason: str, label: str | None = None):
        super().__init__(reason)
        self.label = label  # the name shown, when not the candidate's own (a zip entry refused while unpacking)


_Read = Callable[[], bytes]


def _labelled(read: _Read, label: str) -> _Read:
    def read_entry() -> bytes:
        try:
            return read()
        except EntryRefused as why:
            raise _Rejected(str(why), label) from None
    return read_entry


def _head(source: bytes | Path) -> bytes:
    if isinstance(source, Path):
        with source.open("rb") as stream:
            return stream.read(4)
    return source[:4]


def _read_file(source: bytes | Path) -> bytes:
    if not isinstance(source, Path):
        return source
    try:
        return source.read_bytes()
    except OSError:
        raise _Rejected("could not be read") from None


def _read_sources(files, limits: IntakeLimits, report: IntakeReport):
    """Yield (name, bytes or Path) for each input, refusing oversized files before reading them.

    An input is a path (its own name is shown), a (name, bytes) pair or a (name, path) pair (a file saved under a
    name of ours, shown under the member's name)."""
    for item in files:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                yield from _read_sources(sorted(p for p in path.iterdir() if p.is_file()), limits, report)
                continue
            item = (path.name, path)
        name, data = item
        name = PurePosixPath(str(name).replace("\\", "/")).name or "unnamed"
        if isinstance(data, (str, os.PathLike)):
            data = Path(data)
            try:
                size = data.stat().st_size
                is_zip = size and looks_like_zip(_head(data))
            except OSError:
                report.rejected.append((name, "could not be read"))
                continue
        else:
            size, is_zip = len(data), looks_like_zip(data)
        limit = limits.max_unpacked_bytes if is_zip else limits.max_photo_bytes
        if size > limit:
            report.rejected.append((name, f"is {mb(size)}; the most is {mb(limit)} per file"))
            continue
        yield name, data


def _decode(data: bytes, limits: IntakeLimits) -> tuple[Image.Image, list[str]]:
    """Check the header (format, pixel count, size), then decode to an upright RGB image."""
    if not data:
        raise _Rejected("is an empty file")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc"):
        raise _Rejected("is a HEIC photo, which isn't supported; export it as JPEG (on iPhone: Settings → Camera → "
                        "Formats → Most Compatible)")
    notes: list[str] = []
    megapixels = limits.max_pixels // 1_000_000
    try:
        # Reads the header only. PIL itself refuses headers over 2 × Image.MAX_IMAGE_PIXELS; our own, lower
        # limit is checked below, before anything is decoded.
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _Rejected(f"claims an enormous size; the most is {megapixels} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise _Rejected("is not a photo this bot can read; send JPEG, PNG or WebP") from None
    if image.format not in ACCEPTED_FORMATS:
        raise _Rejected(f"is a {image.format} file; send JPEG, PNG or WebP")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _Rejected(f"is {width}×{height} pixels; the most is {megapixels} megapixels")
    if min(width, height) < limits.min_side:
        raise _Rejected(f"is too small ({width}×{height}); photos need at least {limits.min_side} px on the "
                        "shorter side")
    # MPO is how PIL names a phone JPEG that carries extra pictures (depth, HDR); its first one is the photo.
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        notes.append("is animated; only its first frame is used")
    try:
        image.seek(0)
        # JPEGs can decode at 1/2, 1/4 or 1/8 scale: never below the training resolution, far less memory.
        image.draft("RGB", (limits.resolution, limits.resolution))
        decoded = decoded_bytes(image)
        if decoded > limits.max_decoded_bytes:
            raise _Rejected(f"is {width}×{height} pixels at {_depth(image)}: {mb(decoded)} once opened; the most is "
                            f"{mb(limits.max_decoded_bytes)}. Send it as an ordinary JPEG, or smaller")
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # copies only a photo that needs turning
        upright = _shrink(image, limits.resolution)
        return _shrink(_to_rgb(upright, limits.resolution), limits.resolution), notes
    except Image.DecompressionBombError:
        raise _Rejected(f"is larger than {megapixels} megapixels when opened") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise _Rejected("is damaged or incomplete; send the original photo again") from None


def decoded_bytes(image: Image.Image) -> int:
    """What decoding `image` takes, from its header: pixels × channels × bytes per sample (after any JPEG draft)."""
    width, height = image.size
    try:
        mode = ImageMode.getmode(image.mode)
        per_pixel = len(mode.bands) * int(mode.typestr[-1])
    except (KeyError, ValueError):
        per_pixel = 4
    return width * height * per_pixel


def _depth(image: Image.Image) -> str:
    mode = ImageMode.getmode(image.mode)
    return f"{len(mode.bands)} × {8 * int(mode.typestr[-1])}-bit channel{'s' if len(mode.bands) > 1 else ''}"


def _shrink(image: Image.Image, resolution: int) -> Image.Image:
    """Reduce a grey or colour image by a whole factor that keeps its shorter side at the training resolution or
    above, as a JPEG draft does: checks, face search and crop then work on a few megapixels, never on forty."""
    factor = min(image.size) // resolution
    if factor < 2 or image.mode not in ("L", "RGB"):  # alpha and palettes are resolved first (_to_rgb)
        return image
    return image.reduce(factor)


def _to_rgb(image: Image.Image, resolution: int) -> Image.Image:
    """Any mode to 8-bit RGB; transparency becomes white; 16-bit and float images are scaled by depth, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _shrink(_wide_to_grey(image), resolution).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_to_grey(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey to 8-bit, scaled a strip of rows at a time: one copy of the samples as they
    are (no larger than the decoded photo) and no full-size float copy (8 bytes a pixel, several times over)."""
    samples = np.asarray(image)
    highest = float(samples.max())
    if image.mode == "F":
        full_scale = 1.0 if highest <= 1.0 else 255.0
    else:  # 16-bit samples; a mode-I image holding 8-bit values stays as it is
        full_scale = 65535.0 if highest > 255 else 255.0
    grey = np.empty(samples.shape, np.uint8)
    rows = max(1, STRIP_PIXELS // samples.shape[1])
    for top in range(0, samples.shape[0], rows):
        strip = samples[top:top + rows]
        if image.mode == "F":
            grey[top:top + rows] = np.clip(strip / full_scale * 255.0, 0, 255).round()
        else:  # whole numbers: v × 255 / 65535 rounded, in integers (never exactly half way: 65535 is odd)
            scale = int(full_scale)
            grey[top:top + rows] = (np.clip(strip, 0, scale).astype(np.int64) * 255 + scale // 2) // scale
    return Image.fromarray(grey, "L")


def _difference_hash(image: Image.Image) -> int:
    """64-bit dHash: which neighbour is brighter on a 9×8 grey thumbnail. Survives re-encoding and resizing."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _sharpness(image: Image.Image) -> float:
    import cv2

    return float(cv2.Laplacian(grey_for_analysis(image), cv2.CV_64F).var())


def _stem_key(name: str) -> str:
    """photos/IMG_1.JPG and photos/img_1.txt pair up: same folder, same name, any extension or case."""
    return str(PurePosixPath(name).with_suffix("")).lower()


def _caption(text_file: tuple[str, _Read] | None) -> str | None:
    if text_file is None:
        return None
    try:
        text = text_file[1]()
    except _Rejected:
        return None
    caption = " ".join(text[:CAPTION_CHARS * 4].decode("utf-8", errors="replace").split())[:CAPTION_CHARS]
    return caption or None


def _grouped(pairs) -> list[tuple[str, str]]:
    """(message, file) pairs → (message, "`a.jpg`, `b.jpg` and 3 more") in first-seen order."""
    groups: dict[str, list[str]] = {}
    for message, name in pairs:
        groups.setdefault(message, []).append(name)
    result = []
    for message, names in groups.items():
        shown = ", ".join(_code(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        result.append((message, shown))
    return result


def _code(name: str) -> str:
    # File names are the member's text: in `code` Discord shows them as typed (IMG_1_2.jpg is not italic).
    return "`" + "".join(c for c in name if c.isprintable() and c != "`")[:80] + "`"


def _fit(lines: list[str], limit: int) -> str:
    """Join lines, dropping middle ones (never the first or the last) until the text fits in `limit` characters."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    head, middle, tail = lines[0], lines[1:-1], lines[-1]
    while middle:
        middle.pop()
        text = "\n".join([head, *middle, f"… and {len(lines) - 2 - len(middle)} more lines", tail])
        if len(text) <= limit:
            return text
    return "\n".join([head, tail])[:limit]

