"""One request's work directory on a Ray actor: a mirror of the bot's data directory holding just the request's input
files, so the engines run on the same relative layout (concepts/<id>/photos, concepts/<id>/checkpoint, images/<job>)
without a shared file system.

Paths in the request are the bot's (absolute, under its data directory); they are rewritten to this directory on the
way in and back on the way out. After the run, every file that is new or changed goes back to the bot, and every input
that the run removed (a finished training's checkpoint) is reported as deleted.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from trainer.remote.blobs import BlobStore


def safe_relative(rel: str) -> PurePosixPath:
    """A path the bot sent, relative to its data directory; nothing that could leave the work directory."""
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(f"not a relative path inside the data directory: {rel!r}")
    return path


def rewrite_paths(value: Any, old_root: str, new_root: str) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with every string that is a path under `old_root` moved under
    `new_root`, dictionary keys included (an /imagine result maps image paths to their small copies)."""
    if isinstance(value, str):
        if value == old_root or value.startswith(old_root + "/"):
            return new_root + value[len(old_root):]
        return value
    if isinstance(value, dict):
        return {rewrite_paths(k, old_root, new_root): rewrite_paths(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rewrite_paths(item, old_root, new_root) for item in value]
    return value


class WorkDir:
    def __init__(self, root: Path, bot_root: str):
        self.root = Path(root)
        self.bot_root = bot_root.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)
        self._before: dict[str, tuple[int, int]] = {}

    def materialise(self, inputs: dict[str, str], blobs: BlobStore) -> None:
        """Place every input file ({relative path: sha256}) from the cache, then remember what is here."""
        for rel, sha in inputs.items():
            blobs.place(sha, self.root / safe_relative(rel))
        self._before = self._listing()

    def to_actor(self, value: Any) -> Any:
        return rewrite_paths(value, self.bot_root, str(self.root))

    def to_bot(self, value: Any) -> Any:
        return rewrite_paths(value, str(self.root), self.bot_root)

    def relative(self, path: str | Path) -> str | None:
        """`path`'s place relative to the work directory, or None when it lies outside it."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None

    def changes(self) -> tuple[dict[str, Path], list[str]]:
        """({relative path: file} new or changed since `materialise`, [inputs the run removed])."""
        now = self._listing()
        changed = {rel: self.root / rel for rel, stamp in now.items() if self._before.get(rel) != stamp}
        deleted = sorted(rel for rel in self._before if rel not in now)
        return changed, deleted

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _listing(self) -> dict[str, tuple[int, int]]:
        listing = {}
        for folder, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an atomic write that has not finished (or was abandoned)
                path = Path(folder) / name
                stat = path.stat()
                listing[path.relative_to(self.root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return listing
