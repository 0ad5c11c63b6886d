"""Members' traffic through the fake Discord: /imagine, /train with a few photos, /queue cancel; and what they were
told. Each command is answered in the background: a kill -9 may leave it unanswered, which is not an error here
(Discord shows "the application did not respond"); a job that was created anyway is found in the database."""
from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.wire.fake_discord import FakeDiscord, FakeMember, SentInteraction
from trainer.models.tiny import write_sample_photos

QUEUED_AS = re.compile(r"Queued as job (\d+)")
TRAINING_QUEUED = "Your training is queued"
ANSWER_TIMEOUT_S = 90.0
IMAGINE_STEPS = 2
TRAIN_STEPS = (2, 6)
PHOTOS_PER_TRAINING = 3
PROMPTS = ("a red dog", "a blue cat on the beach", "a portrait of a man", "a green astronaut", "a woman in a park")
# What the members do, by weight. Cancels pick one of the member's own jobs the soak knows of.
MIX = {"imagine": 0.72, "train": 0.12, "cancel": 0.16}


@dataclass
class Told:
    """What members were told: the soak's record of submitted jobs."""
    imagines: dict[int, FakeMember] = field(default_factory=dict)   # job id -> owner ("Queued as job N")
    trainings: dict[str, FakeMember] = field(default_factory=dict)  # token -> owner (intake report said queued)
    cancels: list[int] = field(default_factory=list)                # job ids a cancel was sent for
    commands: dict[str, int] = field(default_factory=dict)          # command -> how many were sent
    unanswered: int = 0                                             # commands that got no answer in time


class Members:
    def __init__(self, fake: FakeDiscord, rng: random.Random, photos_dir: Path, count: int = 4):
        self.fake = fake
        self.rng = rng
        self.photos_dir = photos_dir
        self.members = [fake.member(f"soaker{i}") for i in range(count)]
        self.told = Told()
        self._answers: set[asyncio.Task] = set()

    async def act(self, open_jobs: dict[int, FakeMember]) -> None:
        """One member does one thing. `open_jobs`: jobs without an outcome yet, with their owners (cancel targets)."""
        action = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if action == "cancel" and not open_jobs:
            action = "imagine"
        self.told.commands[action] = self.told.commands.get(action, 0) + 1
        if action == "imagine":
            member = self.rng.choice(self.members)
            options = [{"name": "prompt", "type": 3, "value": self.rng.choice(PROMPTS)},
                       {"name": "steps", "type": 4, "value": IMAGINE_STEPS},
                       {"name": "seed", "type": 4, "value": self.rng.randrange(2**31)}]
            interaction = await self.fake.command(member, "imagine", options)
            self._answer(interaction, lambda text: self._imagine_told(text, member))
        elif action == "train":
            await self._train(self.rng.choice(self.members))
        else:
            job_id, member = self.rng.choice(sorted(open_jobs.items()))
            self.told.cancels.append(job_id)
            interaction = await self.fake.command(member, "queue", [{"name": "job", "type": 4, "value": job_id}],
                                                  subcommand=["cancel"])
            self._answer(interaction, lambda text: None)

    async def _train(self, member: FakeMember) -> None:
        token = "".join(self.rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5))
        folder = write_sample_photos(self.photos_dir / token, count=PHOTOS_PER_TRAINING,
                                     seed=self.rng.randrange(2**31))
        attachments = [self.fake.add_attachment(path.name, path.read_bytes()) for path in sorted(folder.iterdir())]
        options = [{"name": "token", "type": 3, "value": token}, {"name": "class", "type": 3, "value": "dog"},
                   {"name": "steps", "type": 4, "value": self.rng.randint(*TRAIN_STEPS)}]
        options += [{"name": f"photo{i + 1}", "type": 11, "value": a["id"]} for i, a in enumerate(attachments)]
        interaction = await self.fake.command(member, "train", options, attachments=attachments)

        def told(text: str) -> None:
            if TRAINING_QUEUED in text:
                self.told.trainings[token] = member
        self._answer(interaction, told)

    def _imagine_told(self, text: str, member: FakeMember) -> None:
        if match := QUEUED_AS.search(text):
            self.told.imagines[int(match.group(1))] = member

    def _answer(self, interaction: SentInteraction, on_text) -> None:
        async def wait() -> None:
            try:
                # The deferral comes first; the text follows when the command has done its work.
                text = await self.fake.wait_for(lambda: interaction.text(), ANSWER_TIMEOUT_S, "an answer")
            except AssertionError:
                self.told.unanswered += 1
                return
            on_text(text)
        task = asyncio.create_task(wait())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def settle(self, timeout: float) -> None:
        """Wait up to `timeout` for the answers still on their way; stop waiting for the rest (unanswered)."""
        if self._answers:
            _, late = await asyncio.wait(set(self._answers), timeout=timeout)
            for task in late:
                task.cancel()
            self.told.unanswered += len(late)
