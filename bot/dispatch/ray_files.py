"""Files between the bot's data directory and a Ray actor that shares no file system with it.

Going out: the input files of a request (a training's photos and its last checkpoint; an /imagine's LoRAs and its
init image), named by their path relative to the data directory and by content hash, so an actor that already holds a
file (a LoRA it used before, a checkpoint it wrote itself) is not sent it again. Coming back: the files the run made or
changed, written under the data directory (to a temporary name, then renamed), and the inputs it removed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from trainer.contract.files import write_bytes_atomic
from trainer.contract.protocol import JobKind

CHECKPOINT_DIR = "checkpoint"  # trainer/training/checkpoint.py: out_dir/checkpoint/


def _files_in(folder: str | None) -> list[Path]:
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))


def train_inputs(params: dict) -> list[Path]:
    """The photos (and captions) and the checkpoint the previous slice left, if any."""
    out_dir = params.get("out_dir")
    return _files_in(params.get("photos_dir")) + _files_in(out_dir and str(Path(out_dir) / CHECKPOINT_DIR))


def imagine_inputs(params: dict) -> list[Path]:
    paths = [c.get("lora_path") for c in params.get("concepts") or []] + [params.get("init_image")]
    return [Path(p) for p in paths if p and Path(p).is_file()]


INPUTS: dict[str, Callable[[dict], list[Path]]] = {JobKind.TRAIN: train_inputs, JobKind.IMAGINE: imagine_inputs}


def input_files(message: dict) -> list[Path]:
    """Every file a `run` / `run_many` message reads (kinds not listed in INPUTS read none)."""
    jobs = message.get("jobs") or [message]
    found: dict[Path, None] = {}
    for job in jobs:
        for path in INPUTS.get(job["kind"], lambda params: [])(job["params"]):
            found[path] = None
    return list(found)


class FileHashes:
    """SHA-256 of files under the data directory, worked out again only when a file's size or time changed."""

    def __init__(self):
        self._known: dict[str, tuple[int, int, str]] = {}

    def sha(self, path: Path) -> str:
        stat = path.stat()
        known = self._known.get(str(path))
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        self.remember(path, digest.hexdigest())
        return self._known[str(path)][2]

    def remember(self, path: Path, sha: str) -> None:
        stat = path.stat()
        self._known[str(path)] = (stat.st_size, stat.st_mtime_ns, sha)


def relative_to_root(path: Path, root: Path) -> str:
    """`path` relative to the data directory; ValueError for a file outside it (it cannot be mirrored)."""
    return Path(path).resolve().relative_to(root).as_posix()


def inside_root(root: Path, rel: str) -> Path:
    """The bot's file for a path an actor named: always under the data directory."""
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(f"a Ray worker named a file outside the data directory: {rel!r}")
    return root / path


def write_returned(root: Path, files: dict[str, dict], deleted: list[str], hashes: FileHashes) -> int:
    """Write the files a run made ({relative path: {"sha", "data"}}), remove the inputs it removed; returns the bytes
    written."""
    written = 0
    for rel, file in files.items():
        path = inside_root(root, rel)
        write_bytes_atomic(path, file["data"])
        hashes.remember(path, file["sha"])
        written += len(file["data"])
    for rel in deleted:
        path = inside_root(root, rel)
        path.unlink(missing_ok=True)
        _remove_empty_folders(path.parent, root)
    return written


def _remove_empty_folders(folder: Path, root: Path) -> None:
    """As the engine removes a whole folder (a finished training's checkpoint/), so does the bot, once it is empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone)
            return
        folder = folder.parent


def write_preview(root: Path, preview_file: dict) -> int:
    write_bytes_atomic(inside_root(root, preview_file["path"]), preview_file["data"])
    return len(preview_file["data"])


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
