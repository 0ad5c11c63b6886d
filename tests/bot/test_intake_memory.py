"""Uploads cannot grow the bot: /train's photo intake runs in a child process under an address-space limit
(bot/services/photo_intake.py). Every case of the hostile corpus (tests/trainer/hostile.py) goes through
`submit_training` as the cog sends it, gets a clear answer, and the bot process's RSS stays within 50 MB of where it
started. Timings per case are a benchmark: `python -m bench.intake_memory`."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bot.app import Services
from bot.errors import UserError
from bot.services import photo_intake
from bot.services.photo_intake import intake_workspace, take_in_photos
from bot.services.submissions import submit_training
from tests.trainer.hostile import CASES, good_photos, write_corpus_in_child
from trainer.intake.photos import IntakeLimits

RSS_ALLOWANCE = 50 * 1024 * 1024


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class IdleDispatcher:
    """Nothing runs the queued trainings here; submit_training only wakes the dispatcher."""

    def wake(self) -> None:
        pass


@pytest.fixture
def services(settings, store, ledger, concepts, gallery, admin) -> Services:
    return Services(settings=replace(settings, min_photos=1), store=store, ledger=ledger, concepts=concepts,
                    gallery=gallery, admin=admin, worker=None, dispatcher=IdleDispatcher())


async def train(services: Services, number: int, files):
    return await submit_training(services, guild_id=1, member_id=1000 + number, channel_id=5, role_ids=[],
                                 token=f"zq{chr(ord('a') + number)}xv", class_name="man", style=False, files=files)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS from /proc")
async def test_hostile_uploads_get_clear_answers_and_leave_the_bot_process_as_it_was(services, tmp_path):
    corpus = write_corpus_in_child(tmp_path / "corpus")
    await train(services, 0, good_photos(3))  # the first intake: code paths warm, SQLite pages cached
    gc.collect()
    before = resident_bytes()
    answers = {}
    for number, (case, path) in enumerate(corpus, start=1):
        upload = path.read_bytes()
        try:
            job, report = await train(services, number, [(case.name, upload)])
            answers[case.name] = None
        except UserError as refusal:
            answers[case.name] = str(refusal)
        del upload
    gc.collect()
    grown = resident_bytes() - before
    assert grown <= RSS_ALLOWANCE, f"the bot process grew by {grown / 2**20:.0f} MB taking in the hostile corpus"
    for case in CASES:
        if case.expect is None:
            assert answers[case.name] is None, (case.name, answers[case.name])
        else:
            assert answers[case.name] and case.expect in answers[case.name], (case.name, answers[case.name])
    assert not list((services.settings.data_dir / photo_intake.WORKSPACES).iterdir())  # nothing left behind


async def test_photos_arrive_as_saved_files_and_the_report_carries_thumbnails(services, tmp_path):
    saved = []
    for name, data in good_photos(3):
        (tmp_path / f"attachment-{len(saved)}").write_bytes(data)
        saved.append((name, tmp_path / f"attachment-{len(saved)}"))
    job, report = await train(services, 0, saved)
    assert [p.source for p in report.accepted] == ["good0.png", "good1.png", "good2.png"]
    assert report.contact_sheet.startswith(b"\xff\xd8")  # a JPEG, made by the intake process
    photos_dir = services.concepts.concept_dir(job.params["concept_id"]) / "photos"
    assert sorted(p.name for p in photos_dir.iterdir()) == ["000.png", "001.png", "002.png"]


def libraries_address_space_mb() -> int:
    """What the intake child needs before any photo: Python, NumPy, PIL and OpenCV loaded (VmPeak)."""
    code = ("import cv2, numpy, PIL.Image, trainer.intake.photos; "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')).split()[1])")
    from trainer.intake.address_space import QUIET_THREADS

    found = subprocess.run([sys.executable, "-c", code], env={**os.environ, **QUIET_THREADS}, check=True,
                           capture_output=True, text=True, cwd=photo_intake.REPO_ROOT)
    return int(found.stdout) // 1024


async def intake(data_dir: Path, files, **options):
    async with intake_workspace(data_dir) as work_dir:
        return await take_in_photos(files, work_dir, limits=IntakeLimits(), class_name="man", style=False, **options)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
async def test_a_photo_over_the_memory_limit_is_left_out_and_the_others_are_used(tmp_path):
    corpus = write_corpus_in_child(tmp_path / "corpus")
    black = next(path for case, path in corpus if case.name == "black.png")  # 36 MP: 144 MB once decoded
    report = await intake(tmp_path / "data", good_photos(3) + [("black.png", black)],
                          memory_mb=libraries_address_space_mb() + 64)
    assert dict(report.rejected) == {"black.png": "is too large to process; send a smaller photo (an ordinary JPEG)"}
    assert len(report.accepted) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
async def test_a_limit_too_low_for_the_libraries_is_logged_for_the_operator(tmp_path, caplog):
    with pytest.raises(UserError, match="can't be processed on this bot right now"):
        await intake(tmp_path / "data", good_photos(3), memory_mb=40)
    assert "photo intake cannot start" in caplog.text and "40 MB" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in crash is a SIGKILL")
async def test_a_child_that_dies_or_hangs_is_a_clear_answer_and_the_next_intake_works(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    with monkeypatch.context() as patch:  # what a crash in a decoder's C code looks like from the bot
        patch.setattr(photo_intake, "CHILD", ("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
        with pytest.raises(UserError, match="too large to process"):
            await intake(data_dir, good_photos(3))
    with pytest.raises(UserError, match="took too long"):
        await intake(data_dir, good_photos(3), timeout_s=0.01)
    report = await intake(data_dir, good_photos(3))
    assert report.ok and len(report.accepted) == 3
    assert not list((data_dir / photo_intake.WORKSPACES).iterdir())


def test_stale_workspaces_of_a_killed_bot_are_removed(tmp_path):
    stale = tmp_path / photo_intake.WORKSPACES / "0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "attachment-00").write_bytes(b"x")
    os.utime(stale, (0, 0))
    photo_intake._remove_stale(tmp_path / photo_intake.WORKSPACES)
    assert not stale.exists()
