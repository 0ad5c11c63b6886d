"""Helpers of the wire tier: the Booth (bot + services against the fake Discord) and ways to drive and read it."""
from __future__ import annotations

import asyncio
import contextlib
import io
import re
from dataclasses import dataclass, replace
from pathlib import Path

from bench.wire.fake_discord import FakeDiscord, FakeMember, SentInteraction
from bot.app import start_services
from bot.client import BoothBot
from bot.settings import Settings
from bot.dispatch.worker_client import WorkerClient, worker_command
from bot.dispatch.workers import local_devices

ANSWER_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 120.0
STEPS = 2  # denoising steps of test images: enough to exercise the progress path, cheap on the tiny model


def photo_bytes(seed: int, size: int = 256, fmt: str = "PNG") -> bytes:
    """A distinct, decodable photo-like image (noise over a gradient), so intake's dedupe keeps each one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * (seed % 7 + 1)) % 256, (y * (seed % 5 + 2)) % 256, ((x + y) * 3) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


@dataclass
class Booth:
    fake: FakeDiscord
    settings: Settings
    bot: BoothBot | None = None
    services: object | None = None
    _task: asyncio.Task | None = None

    async def start(self, *, with_discord: bool = True) -> None:
        # One torch thread: the worker shares 2 CI cores with this process, and torch's spinning thread pool slows
        # down many times over when the cores are oversubscribed.
        workers = [WorkerClient(worker_command(model=self.settings.model, data_dir=self.settings.data_dir,
                                               device=device, dtype=self.settings.dtype, threads=1,
                                               models=self.settings.base_models,
                                               resident=self.settings.resident_models))
                   for device in local_devices(self.settings)]  # BOOTHBOT_WORKERS=local:cpu,cpu: two lanes
        self.services = await start_services(self.settings, workers=workers)
        if with_discord:
            await self.connect()

    async def connect(self) -> None:
        self.bot = BoothBot(self.settings, self.services, guild_ready_timeout=0.1)
        self._task = asyncio.create_task(self.bot.start(self.settings.discord_token), name="bot")
        deadline = asyncio.get_running_loop().time() + 60
        while not self.bot.is_ready():
            if self._task.done():
                self._task.result()  # raises what stopped the bot
                raise AssertionError("the bot stopped before it was ready")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("the bot did not connect to the fake Discord within 60 s")
            await asyncio.sleep(0.05)

    async def disconnect(self) -> None:
        if self.bot is not None:
            await self.bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.bot = None

    async def stop(self) -> None:
        await self.disconnect()
        if self.services is not None:
            await self.services.stop()
            self.services = None

    # ----- driving and reading -----------------------------------------------------------------------------------
    async def answer(self, interaction: SentInteraction, timeout: float = ANSWER_TIMEOUT_S) -> str:
        """What the member was told (waits until there is text)."""
        what = f"an answer to {interaction.payload['data']}"
        return await self.fake.wait_for(lambda: interaction.text(), timeout, what)

    async def job(self, job_id: int):
        return await self.services.ledger.get(job_id)

    async def wait_job(self, job_id: int, statuses=("succeeded", "failed", "cancelled", "interrupted"),
                       timeout: float = JOB_TIMEOUT_S):
        async def reached():
            while True:
                job = await self.services.ledger.get(job_id)
                if job is not None and job.status in statuses:
                    return job
                await asyncio.sleep(0.1)
        try:
            return await asyncio.wait_for(reached(), timeout)
        except asyncio.TimeoutError:
            job = await self.services.ledger.get(job_id)
            raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s: {job}") from None

    async def latest_job(self, member: FakeMember):
        jobs = await self.services.ledger.list_jobs(owner_id=member.id, limit=1)
        return jobs[0] if jobs else None

    def attach(self, *files: tuple[str, bytes, str]) -> list[dict]:
        return [self.fake.add_attachment(name, data, content_type) for name, data, content_type in files]


def booth_settings(fake: FakeDiscord, data_dir: Path, model_dir: Path, **overrides) -> Settings:
    settings = Settings(discord_token="fake-token", guild_ids=(fake.guild_id,), model=str(model_dir),
                        data_dir=data_dir, device="cpu", dtype="fp32", admin_role="Booth Admin",
                        max_queued_jobs=3, trainings_per_day=5, min_photos=3, max_photos=30, max_photo_mb=2,
                        train_slice_s=30.0, imagine_timeout_s=120, train_timeout_s=300)
    return replace(settings, **overrides)


def imagine_options(prompt: str, **extra) -> list[dict]:
    types = {"negative": 3, "seed": 4, "steps": 4, "cfg": 10, "size": 3, "count": 4}
    return [{"name": "prompt", "type": 3, "value": prompt}] + [
        {"name": name, "type": types[name], "value": value} for name, value in extra.items()]


def result_messages(fake, job_id: int) -> list[dict]:
    """Channel messages carrying the result buttons of this job."""
    return [m for m in fake.channel_messages()
            if any(c.get("custom_id") == f"bb:reroll:{job_id}" for row in m.get("components") or []
                   for c in row.get("components") or [])]


def button_ids(message: dict) -> list[str]:
    return [c["custom_id"] for row in message.get("components") or [] for c in row.get("components") or []]


async def run_imagine(booth, member, prompt: str, *, upload_limit: int = 10 * 1024 * 1024,
                      **options) -> tuple[object, dict]:
    interaction = await booth.fake.command(member, "imagine", imagine_options(prompt, **options),
                                           upload_limit=upload_limit)
    text = await booth.answer(interaction)
    match = re.search(r"job (\d+)", text)
    assert match and interaction.ephemeral, text
    job = await booth.wait_job(int(match.group(1)))
    assert job.status == "succeeded", job.error
    results = await booth.fake.wait_for(lambda: result_messages(booth.fake, job.id), what=f"job {job.id}'s result")
    return job, results[0]
