"""Open a member's .zip of photos with every bound checked before anything is parsed or inflated.

The zip's table of contents (its central directory) is found and measured here first: its size and the true number
of entries in it, walked header by header, because the end record's entry count may lie and `zipfile` builds an
object per entry before anyone can count them. Entries are then listed without being read; each is inflated only
when intake asks for it (one photo at a time), cut off at the per-file bound whatever its header says.
Nothing is ever written to disk under a name from the zip, but hostile entries (paths leaving the zip, links,
password-protected or nested zips) are still refused so the member hears why those files were not used.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

JUNK_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
DIRECTORY_BYTES_PER_ENTRY = 1024  # a real entry's header is 46 bytes + its name and extras: a generous allowance
_END_OF_DIRECTORY = b"PK\x05\x06"
_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_END = b"PK\x06\x06"
_ZIP64_END_SIZE = 56
_ENTRY_HEADER = b"PK\x01\x02"
_ENTRY_HEADER_SIZE = 46
_MAX_COMMENT = 65535


class ZipRefused(Exception):
    """The whole zip is refused; str() is the reason, in words a member understands."""


@dataclass(frozen=True)
class Directory:
    entries: int  # entries in the central directory, counted one header at a time
    size: int  # bytes of the central directory


@dataclass
class Unpacked:
    # (path inside the zip, read): read() inflates the entry then, at most max_file_bytes; raises EntryRefused
    files: list[tuple[str, Callable[[], bytes]]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name shown to the member, reason)
    skipped: int = 0  # operating-system leftovers (__MACOSX, .DS_Store, Thumbs.db), not the member's files
    declared_bytes: int = 0  # what the listed entries say they unpack to (zipfile never inflates more than that)


class EntryRefused(Exception):
    """One entry is not used; str() is the reason."""


def looks_like_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", _END_OF_DIRECTORY)


def read_directory(stream: BinaryIO, *, max_entries: int, max_bytes: int) -> Directory:
    """Find the central directory from the end record (zip64 too), refuse it if it is larger than `max_bytes`,
    then count its entry headers. Raises ZipRefused; reads at most 64 KB + `max_bytes` of the file."""
    file_size = stream.seek(0, os.SEEK_END)
    tail_size = min(file_size, _END_SIZE + _MAX_COMMENT)
    stream.seek(file_size - tail_size)
    tail = stream.read(tail_size)
    at = tail.rfind(_END_OF_DIRECTORY)
    if at < 0 or len(tail) < at + _END_SIZE:
        raise ZipRefused("is a damaged zip file; zip the photos again and resend")
    _, _, _, _, _, size, _, _ = struct.unpack_from("<4s4H2LH", tail, at)
    end = file_size - tail_size + at  # where the central directory ends: zipfile computes its start the same way
    locator = _read_at(stream, end - _ZIP64_LOCATOR_SIZE, _ZIP64_LOCATOR_SIZE)
    if locator[:4] == _ZIP64_LOCATOR:
        end -= _ZIP64_LOCATOR_SIZE + _ZIP64_END_SIZE
        record = _read_at(stream, end, _ZIP64_END_SIZE)
        if len(record) < _ZIP64_END_SIZE or record[:4] != _ZIP64_END:
            raise ZipRefused("is a damaged zip file; zip the photos again and resend")
        size = struct.unpack_from("<Q", record, 40)[0]
    if size > max_bytes:
        raise ZipRefused(f"has a list of contents of {mb(size)}, far more than a zip of {max_entries} photos needs; "
                         "zip just the photos and resend")
    start = end - size
    table = _read_at(stream, start, size)
    if start < 0 or len(table) != size:
        raise ZipRefused("is a damaged zip file; zip the photos again and resend")
    count, position = 0, 0
    while position < size:  # the same walk zipfile makes, without building anything
        if table[position:position + 4] != _ENTRY_HEADER or position + _ENTRY_HEADER_SIZE > size:
            raise ZipRefused("is a damaged zip file; zip the photos again and resend")
        name, extra, comment = struct.unpack_from("<3H", table, position + 28)
        position += _ENTRY_HEADER_SIZE + name + extra + comment
        count += 1
    return Directory(entries=count, size=size)


def unpack_zip(zip_name: str, source: bytes | os.PathLike, *, max_entries: int, max_file_bytes: int,
               max_total_bytes: int) -> tuple[Unpacked, zipfile.ZipFile | None]:
    """List the usable entries of a zip (bytes or a path). Returns the listing and the open archive, which the
    entries' read() functions need: the caller closes it when done (None when the zip was refused outright)."""
    result = Unpacked()
    in_memory = isinstance(source, (bytes, bytearray))
    try:
        with io.BytesIO(source) if in_memory else open(source, "rb") as stream:
            directory = read_directory(stream, max_entries=max_entries,
                                       max_bytes=max_entries * DIRECTORY_BYTES_PER_ENTRY)
        if directory.entries > max_entries:
            raise ZipRefused(f"holds {directory.entries} files; the most is {max_entries}")
        try:
            archive = zipfile.ZipFile(io.BytesIO(source) if in_memory else source)
            entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            raise ZipRefused("is a damaged zip file; zip the photos again and resend") from None
    except ZipRefused as why:
        result.rejected.append((zip_name, str(why)))
        return result, None
    files = [e for e in entries if not e.is_dir()]
    total_declared = sum(e.file_size for e in files)
    if total_declared > max_total_bytes:
        archive.close()
        result.rejected.append((zip_name, f"unpacks to {mb(total_declared)}; the most is {mb(max_total_bytes)}"))
        return result, None

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
        result.declared_bytes += entry.file_size
        result.files.append((str(inside), _reader(archive, entry, max_file_bytes)))
    return result, archive


def _reader(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> Callable[[], bytes]:
    def read() -> bytes:
        content = _read_at_most(archive, entry, limit)
        if looks_like_zip(content):
            raise EntryRefused("is a zip inside the zip; put all the photos in one zip")
        return content
    return read


def _read_at_most(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> bytes:
    """Inflate at most `limit` bytes, whatever the header claims: a lying zip bomb is cut off, not unpacked."""
    chunks, total = [], 0
    try:
        with archive.open(entry) as stream:
            while chunk := stream.read(1 << 16):
                total += len(chunk)
                if total > limit:
                    raise EntryRefused(f"unpacks to more than {mb(limit)}; it was not used")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, struct.error):
        # A CRC mismatch lands here too: zipfile stops at the declared size, so a header that understates the
        # real size shows up as a damaged entry.
        raise EntryRefused("could not be unpacked (the zip is damaged or uses a compression I can't open)") from None
    return b"".join(chunks)


def _read_at(stream: BinaryIO, offset: int, size: int) -> bytes:
    if offset < 0:
        return b""
    stream.seek(offset)
    return stream.read(size)


def mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1024 * 1024 else f"{max(1, size // 1024)} KB"
