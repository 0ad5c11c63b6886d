"""The base models the bot offers (BOOTHBOT_MODEL + BOOTHBOT_MODELS), each server's default, and which model a job
runs on: a /train on the server's default, an /imagine on the model its concepts were trained on.

What the bot knows of a model besides its name and reference (its family, whether it is loaded, why it cannot be
used) comes from the GPU worker, which detects it from the model's files (trainer/models/detection.py): the `ready`
event's "models" and every later `models` event (WorkerClient.models_info).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.errors import UserError
from bot.services.admin import write_audit
from trainer.contract.families import FAMILIES, Family


@dataclass(frozen=True)
class BaseModel:
    name: str
    ref: str
    family: Family | None  # None until the worker has looked at it
    resident: bool  # loaded on the GPU now
    problem: str | None  # why the worker cannot use it
    native_side: int | None = None  # its training resolution (the sizes /imagine may ask of it), once known

    def label(self) -> str:
        """"pony (SDXL)", or just the name while its family is unknown."""
        return f"{self.name} ({self.family.label})" if self.family else self.name


class BaseModels:
    def __init__(self, store, settings, worker, clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings
        self.worker = worker
        self.clock = clock

    # --- the catalogue ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.settings.base_models)

    def offered(self, name: str) -> bool:
        return name in self.settings.base_models

    def listing(self) -> list[BaseModel]:
        facts = {entry.get("name"): entry for entry in (getattr(self.worker, "models_info", None) or [])}
        return [self._model(name, ref, facts.get(name, {})) for name, ref in self.settings.base_models.items()]

    def get(self, name: str) -> BaseModel | None:
        return next((model for model in self.listing() if model.name == name), None)

    @staticmethod
    def _model(name: str, ref: str, fact: dict) -> BaseModel:
        return BaseModel(name, ref, FAMILIES.get(fact.get("family") or ""), bool(fact.get("resident")),
                         fact.get("problem"), fact.get("native_side"))

    def model_of(self, concept) -> str:
        """The base model a concept was trained on (concepts from before base models were recorded: the bot's
        default, the only model there was)."""
        return concept.base_model or self.settings.default_model_name

    # --- the server's default ---------------------------------------------------------------------------------------
    async def stored_default(self, guild_id: int) -> str | None:
        async with self.store.read() as db:
            return await db.fetchval("SELECT base_model FROM server_settings WHERE guild_id = ?", (guild_id,))

    async def default_for(self, guild_id: int) -> str:
        """The admins' choice while the bot still offers it, else the bot's default (BOOTHBOT_MODEL)."""
        chosen = await self.stored_default(guild_id)
        return chosen if chosen and self.offered(chosen) else self.settings.default_model_name

    async def set_default(self, by: int, guild_id: int, name: str | None) -> str:
        """Make `name` this server's default (None: back to the bot's); audit-logged. Returns the new default."""
        if name is not None:
            name = name.strip().lower()
            if not self.offered(name):
                raise UserError(f"This bot has no base model called {name[:40]}; it has "
                                f"{', '.join(self.names())}. `/queue admin models` lists them.")
        async with self.store.immediate() as db:
            await db.execute(
                "INSERT INTO server_settings (guild_id, base_model, updated_by, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (guild_id) DO UPDATE SET base_model = excluded.base_model,"
                " updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                (guild_id, name, by, self.clock()))
            await write_audit(db, guild_id, by, "base_model", "server", name or "default", self.clock())
        return await self.default_for(guild_id)

    # --- which model a job runs on ----------------------------------------------------------------------------------
    async def for_training(self, guild_id: int) -> BaseModel:
        name = await self.default_for(guild_id)
        return self.get(name) or BaseModel(name, self.settings.base_models[name], None, False, None)

    async def for_prompt(self, guild_id: int, concepts: Sequence) -> BaseModel:
        """The model an /imagine with these concepts runs on: theirs, or the server's default without any.
        UserError when they were trained on different models, or on one the bot no longer offers."""
        if not concepts:
            return await self.for_training(guild_id)
        by_model: dict[str, list] = {}
        for concept in concepts:
            by_model.setdefault(self.model_of(concept), []).append(concept)
        if len(by_model) > 1:
            lines = "; ".join(f"{', '.join(c.token for c in trained)} on {self._label(name, trained)}"
                              for name, trained in sorted(by_model.items()))
            raise UserError(f"These concepts were trained on different base models, so they can't be used in one "
                            f"prompt: {lines}. Use the concepts of one model at a time.")
        (name, trained), = by_model.items()
        if not self.offered(name):
            tokens = ", ".join(c.token for c in trained)
            raise UserError(f"{tokens} {'was' if len(trained) == 1 else 'were'} trained on the base model {name}, "
                            f"which this bot does not offer right now. Nothing is lost: {tokens} will work again "
                            "once an admin adds the model back to the bot's settings (BOOTHBOT_MODELS).")
        return self.get(name)

    def _label(self, name: str, trained: Sequence) -> str:
        model = self.get(name)
        family = (model.family if model else None) or FAMILIES.get(trained[0].base_family or "")
        return f"{name} ({family.label})" if family else name

