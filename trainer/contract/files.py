"""Writing a file whole or not at all: to a temporary name in the same directory, then renamed over the target, so
a reader never sees half a file and a crash leaves the old file (or none) behind.

The temporary name is hidden (a leading dot: photo and image listings skip it), ends in .tmp and is unique per
process and thread, since threads and workers may write the same target at once. A failed write removes it. The
new file gets the usual permissions (umask), as a plain write would.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)` (any writer that takes a path: PIL, safetensors, torch.save), then rename the
    temporary file over `path`. Makes the directory when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8, newlines written as given."""
    return write_bytes_atomic(path, text.encode("utf-8"))
