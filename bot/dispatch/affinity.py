"""Which LoRAs a lane's worker holds, as far as the bot knows: the ones it was last sent, up to the worker's cache
(trainer/generation/lora_slots.py keeps 8). The dispatcher prefers, among jobs that start now anyway, to give a lane
the /imagine whose concepts it already holds, so the worker skips reading those LoRA files again.
"""
from __future__ import annotations

import re
from collections import OrderedDict

from bot.jobs.ledger import Job
from trainer.contract.errors import UserError
from trainer.contract.prompts import ConceptSpec, parse_prompt

WORKER_LORA_CACHE = 8  # LoraSlots' default capacity
_WORDS = re.compile(r"\w+")


class LoraAffinity:
    def __init__(self, capacity: int = WORKER_LORA_CACHE):
        self.capacity = capacity
        self._held: OrderedDict[str, tuple[int, str]] = OrderedDict()  # lora path -> (guild id, token lowercased)

    @property
    def held(self) -> list[str]:
        return list(self._held)

    def remember(self, job: Job, params: dict) -> None:
        """`params` (a job's worker params) were sent to this lane's worker: the LoRAs its prompt uses are there now."""
        concepts = params.get("concepts") or []
        if not concepts or "prompt" not in params:
            return
        try:
            uses = parse_prompt(params["prompt"], [ConceptSpec.from_dict(c) for c in concepts]).uses
        except (UserError, ValueError):
            return  # the worker fails this job with its own message; it loaded nothing
        for use in uses:
            path = use.concept.lora_path
            if path:
                self._held[path] = (job.guild_id, use.concept.token.lower())
                self._held.move_to_end(path)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    def score(self, job: Job) -> int:
        """How many of the LoRAs this lane holds `job`'s prompt names (a word or a <lora:...> tag of its server)."""
        prompt = job.params.get("prompt")
        if not self._held or not isinstance(prompt, str):
            return 0
        words = set(_WORDS.findall(prompt.lower()))
        return sum(1 for guild_id, token in self._held.values() if guild_id == job.guild_id and token in words)
