"""The Ray actor's content-addressed file cache: every file the bot sent (photos, LoRAs, checkpoints) and every file
the actor sent back, stored once under its SHA-256, so the same LoRA or photo crosses the network once per actor.

Files are hard links when the file system allows it (a request's work directory links to the cache, so nothing is
copied) and the least recently used go first once the cache is over its size. The engines write files only through
trainer/contract/files.py (a new file renamed over the old name), so a linked input is never changed in place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from trainer.contract.files import write_bytes_atomic

DEFAULT_LIMIT_BYTES = 4 * 1024 ** 3


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


class BlobStore:
    def __init__(self, root: Path, limit_bytes: int = DEFAULT_LIMIT_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"not a SHA-256: {sha!r}")
        return self.root / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def missing(self, shas) -> list[str]:
        return sorted({sha for sha in shas if not self.has(sha)})

    def put(self, sha: str, data: bytes) -> None:
        if sha256_of(data) != sha:
            raise ValueError(f"the bytes sent for {sha[:12]}… do not have that hash")
        if not self.has(sha):
            write_bytes_atomic(self.path(sha), data)
        self._trim()

    def adopt(self, sha: str, path: Path) -> None:
        """Keep the file at `path` (whose hash is `sha`) in the cache too."""
        if not self.has(sha):
            link_or_copy(path, self.path(sha))
        self._trim()

    def place(self, sha: str, target: Path) -> None:
        """Put the cached file at `target` (a link: no copy) and count it as just used."""
        source = self.path(sha)
        os.utime(source)
        link_or_copy(source, target)

    def _trim(self) -> None:
        with self._lock:
            entries = [(p.stat(), p) for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            total = sum(stat.st_size for stat, _ in entries)
            for stat, path in sorted(entries, key=lambda entry: entry[0].st_mtime_ns):
                if total <= self.limit_bytes:
                    return
                path.unlink(missing_ok=True)  # a request that linked it keeps its own link
                total -= stat.st_size
