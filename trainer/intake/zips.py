"""Unpack a member's .zip of photos in memory, with every bound checked before anything is inflated.

Nothing is ever written to disk under a name from the zip, but hostile entries (paths leaving the zip, links,
password-protected or nested zips) are still refused so the member hears why those files were not used. Sizes are
checked from the headers first and again while reading, because a zip bomb's headers may lie.
"""
from __future__ import annotations

import io
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

JUNK_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
_END_OF_DIRECTORY = b"PK\x05\x06"


@dataclass
class Unpacked:
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (path inside the zip, content)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name shown to the member, reason)
    skipped: int = 0  # operating-system leftovers (__MACOSX, .DS_Store, Thumbs.db), not the member's files


def looks_like_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", _END_OF_DIRECTORY)


def declared_entry_count(data: bytes) -> int | None:
    """The entry count from the end-of-directory record, read before zipfile builds an object per entry."""
    at = data.rfind(_END_OF_DIRECTORY, max(0, len(data) - 22 - 65535))
    if at < 0 or len(data) < at + 22:
        return None
    total = struct.unpack_from("<H", data, at + 10)[0]
    return None if total == 0xFFFF else total  # 0xFFFF: a zip64 record holds the real count


def unpack_zip(zip_name: str, data: bytes, *, max_entries: int, max_file_bytes: int,
               max_total_bytes: int) -> Unpacked:
    result = Unpacked()
    declared = declared_entry_count(data)
    if declared is not None and declared > max_entries:
        result.rejected.append((zip_name, f"holds {declared} files; the most is {max_entries}"))
        return result
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        result.rejected.append((zip_name, "is a damaged zip file; zip the photos again and resend"))
        return result
    files = [e for e in entries if not e.is_dir()]
    if len(entries) > max_entries:
        result.rejected.append((zip_name, f"holds {len(files)} files; the most is {max_entries}"))
        return result
    total_declared = sum(e.file_size for e in files)
    if total_declared > max_total_bytes:
        result.rejected.append((zip_name, f"unpacks to {mb(total_declared)}; the most is {mb(max_total_bytes)}"))
        return result

    unpacked = 0
    for entry in files:
        name = entry.filename.replace("\\", "/")
        label = f"{zip_name}/{name}"
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            result.rejected.append((label, "has a path that points outside the zip; it was not unpacked"))
            continue
        if stat.S_ISLNK(entry.external_attr >> 16):
            result.rejected.append((label, "is a link, not a photo; it was not unpacked"))
            continue
        inside = PurePosixPath(*parts)
        if "__MACOSX" in parts or inside.name.startswith(".") or inside.name.lower() in JUNK_FILES:
            result.skipped += 1
            continue
        if entry.flag_bits & 0x1:
            result.rejected.append((label, "is password-protected; zip the photos without a password"))
            continue
        if entry.file_size > max_file_bytes:
            result.rejected.append((label, f"is {mb(entry.file_size)}; the most is {mb(max_file_bytes)} per file"))
            continue
        budget = min(max_file_bytes, max_total_bytes - unpacked)
        try:
            content = _read_at_most(archive, entry, budget)
        except _TooBig:
            if budget < max_file_bytes:
                result.rejected.append((zip_name, f"unpacks to more than {mb(max_total_bytes)}; the rest was "
                                                  "skipped"))
                return result
            result.rejected.append((label, f"unpacks to more than {mb(max_file_bytes)}; it was not used"))
            continue
        except _Unreadable as why:
            result.rejected.append((label, str(why)))
            continue
        unpacked += len(content)
        if looks_like_zip(content):
            result.rejected.append((label, "is a zip inside the zip; put all the photos in one zip"))
            continue
        result.files.append((str(inside), content))
    return result


class _TooBig(Exception):
    pass


class _Unreadable(Exception):
    pass


def _read_at_most(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> bytes:
    """Inflate at most `limit` bytes, whatever the header claims: a lying zip bomb is cut off, not unpacked."""
    chunks, total = [], 0
    try:
        with archive.open(entry) as stream:
            while chunk := stream.read(1 << 16):
                total += len(chunk)
                if total > limit:
                    raise _TooBig
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, struct.error):
        # A CRC mismatch lands here too: zipfile stops at the declared size, so a header that understates the
        # real size shows up as a damaged entry.
        raise _Unreadable("could not be unpacked (the zip is damaged or uses a compression I can't open)") from None
    return b"".join(chunks)


def mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1024 * 1024 else f"{max(1, size // 1024)} KB"
