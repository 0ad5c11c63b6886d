"""Atomic writes (trainer.contract.files): the target is the old file or the whole new one, never a half or a leftover."""
from __future__ import annotations

import os
import stat

import pytest

from trainer.contract.files import write_atomic, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_target_and_leave_nothing_else(tmp_path):
    target = tmp_path / "new" / "dir" / "file.json"
    assert write_text_atomic(target, "é\n") == target
    assert target.read_bytes() == "é\n".encode("utf-8")
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    write_atomic(target, lambda tmp: tmp.write_bytes(b"three"))
    assert os.listdir(target.parent) == ["file.json"]
    assert target.read_bytes() == b"three"


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert os.listdir(tmp_path) == ["lora.safetensors"] and target.read_bytes() == b"old"


def test_the_file_gets_the_permissions_a_plain_write_would(tmp_path):
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_bytes(b"x")
    write_bytes_atomic(atomic, b"x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
