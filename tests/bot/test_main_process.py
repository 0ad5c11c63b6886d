"""`python -m bot` as a real process: --help, a missing token, and SIGKILL mid-training then a restart on the same
database (the training resumes from its checkpoint; nothing is announced twice)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.services.concepts import ConceptService
from bot.jobs.ledger import Ledger
from bot.settings import load_settings
from bot.store.backups import Backups
from bot.store.database import Store

REPO_ROOT = Path(__file__).resolve().parents[2]
GUILD = 111111111111111111
ALICE, CAROL = 1001, 1003
TRAIN_STEPS = 8


def bot_env(data_dir: Path, model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTHBOT_") and k != "DISCORD_TOKEN"}
    env.update({
        "BOOTHBOT_DATA_DIR": str(data_dir), "BOOTHBOT_MODEL": str(model_dir), "BOOTHBOT_DEVICE": "cpu",
        "BOOTHBOT_DTYPE": "fp32", "BOOTHBOT_TRAIN_SLICE_S": "0.5", "BOOTHBOT_LOG_LEVEL": "info",
        "OMP_NUM_THREADS": "1",  # one torch thread in the worker: predictable on a busy 2-core CI machine
    })
    return env


def start_bot(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "bot", "run", "--no-discord", "--env-file", "/nonexistent"],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def _with_db(settings, action):
    store = await Store.open(settings.db_path)
    try:
        return await action(Ledger(store, settings=settings), ConceptService(store, settings.data_dir), store)
    finally:
        await store.close()


def db(settings, action):
    return asyncio.run(_with_db(settings, action))


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the bot exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def worker_pid(log: Path) -> int | None:
    found = re.findall(r"GPU worker ready: .* pid (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # exited, waiting for its (new) parent to reap it


def test_help_lists_both_commands():
    for args, expected in ((["--help"], "check"), (["check", "--help"], "--gpu"), (["run", "--help"], "--no-discord")):
        done = subprocess.run([sys.executable, "-m", "bot", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout


def test_missing_token_stops_the_start_with_how_to_get_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTHBOT_") and k != "DISCORD_TOKEN"}
    env["BOOTHBOT_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "bot", "--env-file", str(tmp_path / "none")], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "DISCORD_TOKEN is not set" in done.stderr and "discord.com/developers/applications" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_bad_setting_stops_the_start_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTHBOT_")}
    env["BOOTHBOT_MAX_QUEUED_JOBS"] = "plenty"
    done = subprocess.run([sys.executable, "-m", "bot", "run", "--no-discord", "--env-file", str(tmp_path / "x")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "BOOTHBOT_MAX_QUEUED_JOBS='plenty' is not a whole number; allowed: 1..100" in done.stderr


def test_sigkill_mid_training_then_restart_resumes_and_announces_each_job_once(tmp_path, tiny_model_dir):
    env = bot_env(tmp_path / "data", tiny_model_dir)
    settings = load_settings(env, env_file=None)

    async def submit(ledger, concepts, store):
        first = await ledger.submit("imagine", CAROL, GUILD, 5, {"prompt": "a photo of a dog", "steps": 2,
                                                                 "count": 1, "seed": 1})
        concept = await concepts.create(GUILD, ALICE, "sid", "man")
        photos = concepts.concept_dir(concept.id) / "photos"
        photos.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
        train = await ledger.submit("train", ALICE, GUILD, 5, {
            "concept_id": concept.id, "steps": TRAIN_STEPS, "prior_preservation": False, "sample_count": 0,
            "train_text_encoder": False, "resolution": 64})
        await concepts.attach_job(concept.id, train.id, 3)
        return first.id, train.id, concept.id

    imagine_id, train_id, concept_id = db(settings, submit)

    def job(job_id):
        return db(settings, lambda ledger, concepts, store: ledger.get(job_id))

    # First run: the /imagine is announced, then the training is killed in its second (or later) slice.
    log1 = tmp_path / "run1.log"
    bot = start_bot(env, log1)
    try:
        wait_until(lambda: job(imagine_id).delivered_at is not None, 180, "the /imagine job", bot, log1)
        wait_until(lambda: (j := job(train_id)).status == "running" and j.gpu_seconds > 0, 120,
                   "a later slice of the training", bot, log1)
        old_worker = worker_pid(log1)
        bot.send_signal(signal.SIGKILL)
        bot.wait(10)
    finally:
        if bot.poll() is None:
            bot.kill()
    killed_at = job(train_id)
    assert killed_at.status == "running" and killed_at.progress_step < TRAIN_STEPS
    # The orphaned worker sees its stdin close and stops at its next step: it does not keep the GPU busy.
    wait_until(lambda: process_gone(old_worker), 30, "the old worker to exit")

    # Second run on the same database: the training goes back to the queue, resumes and is announced once.
    log2 = tmp_path / "run2.log"
    bot = start_bot(env, log2)
    try:
        wait_until(lambda: job(train_id).delivered_at is not None, 180, "the training to finish", bot, log2)
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(60) == 0
    finally:
        if bot.poll() is None:
            bot.kill()
    new_worker = worker_pid(log2)
    assert new_worker != old_worker and process_gone(new_worker)  # a clean stop stops the worker too

    trained = job(train_id)
    assert trained.status == "succeeded", trained.error
    assert trained.attempts == 1 and trained.result["steps"] == TRAIN_STEPS
    concept = db(settings, lambda ledger, concepts, store: concepts.get(concept_id))
    assert concept.status == "ready" and Path(concept.lora_path).is_file()
    text1, text2 = log1.read_text(errors="replace"), log2.read_text(errors="replace")
    assert f"job {train_id} (train) was running when the bot stopped: now queued" in text2
    delivered = re.findall(r"delivered job (\d+) ", text1 + text2)
    assert sorted(map(int, delivered)) == sorted([imagine_id, train_id])
    assert "Traceback" not in text1 + text2
    # The first start found no backup and wrote one; the second found it minutes old (the next is due in a day).
    (backup,) = Backups(settings.db_path).all()
    assert f"database backup written: {backup.path.resolve()}" in text1 and "backup" not in text2


def test_the_token_never_reaches_the_log():
    import io
    import logging

    from bot.logs import setup_logging

    token = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.secret-part-of-the-token"
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = setup_logging("DEBUG", secrets=[token, None], stream=stream)
    try:
        log = logging.getLogger("boothbot.test")
        log.info("connecting with %s", token)
        try:
            raise RuntimeError(f"Discord said no to {token}")
        except RuntimeError:
            log.exception("login failed")
        text = stream.getvalue()
        assert token not in text and "secret-part" not in text
        assert text.count("[hidden]") == 2 and "login failed" in text and "RuntimeError" in text
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
        logging.captureWarnings(False)
