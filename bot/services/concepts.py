"""Concept registry: the LoRAs members train, who owns them, and who may see, use, share or delete them.

Who may do what (per server):
              see                     use                        share / unshare           delete
  owner       yes, any status         when ready                 yes                       yes
  others      when shared and ready   when shared and ready      no                        no
  admin       yes (visible(is_admin)) like any other member      unshare only (moderation) yes
An admin cannot use or share someone's private concept: it is their likeness, their choice.
For everyone who may not use a concept, its token is plain text in their prompts: a private concept, or one still
training, changes nothing for anyone else and is never named to them. A token names one live concept per server;
an admin can `release` it (the concept holding it is deleted, audit-logged; the cog tells its owner).
Files live in data_dir/concepts/<id>/ (built from the id only) and go when the concept is deleted.
"""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bot.errors import NotFound, PermissionDenied, UserError
from bot.jobs.ledger import cancel_job, touch_member
from bot.services.admin import write_audit
from bot.store.database import Store
from trainer.intake import tokens

_LIVE = "status != 'deleted'"


@dataclass(frozen=True)
class Concept:
    id: int
    guild_id: int
    owner_id: int
    token: str
    class_name: str
    style: bool
    status: str  # "training" | "ready" | "failed"
    shared: bool
    job_id: int | None
    photo_count: int
    lora_path: str | None
    lora_kohya_path: str | None
    created_at: float
    error: str | None = None  # why training failed
    photos_deleted_at: float | None = None  # when photo retention (bot/services/retention.py) deleted the uploads
    base_model: str | None = None  # the name of the base model it was trained on (None: the bot's default model)
    base_family: str | None = None  # that model's family ("sd1" | "sdxl"), once known

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Concept:
        return cls(id=row["id"], guild_id=row["guild_id"], owner_id=row["owner_id"], token=row["token"],
                   class_name=row["class_name"], style=bool(row["style"]), status=row["status"],
                   shared=bool(row["shared"]), job_id=row["job_id"], photo_count=row["photo_count"],
                   lora_path=row["lora_path"], lora_kohya_path=row["lora_kohya_path"], created_at=row["created_at"],
                   error=row["error"], photos_deleted_at=row["photos_deleted_at"], base_model=row["base_model"],
                   base_family=row["base_family"])


def concept_dir(data_dir: Path, concept_id: int) -> Path:
    return Path(data_dir) / "concepts" / str(int(concept_id))


class ConceptService:
    def __init__(self, store: Store, data_dir: Path, clock: Callable[[], float] = time.time, *,
                 model: str | None = None):
        self.store = store
        self.data_dir = Path(data_dir)
        self.clock = clock
        self.model = model  # the base model, whose tokenizer the token rules consult (a local folder only)

    def concept_dir(self, concept_id: int) -> Path:
        return concept_dir(self.data_dir, concept_id)

    # --- reading ----------------------------------------------------------------------------------------------------

    async def get(self, concept_id: int) -> Concept | None:
        """The concept, or None if there is none or it was deleted. No permission check: see `visible`."""
        async with self.store.read() as db:
            row = await db.fetchone(f"SELECT * FROM concepts WHERE id = ? AND {_LIVE}", (concept_id,))
        return None if row is None else Concept.from_row(row)

    async def by_token(self, guild_id: int, token: str) -> Concept | None:
        async with self.store.read() as db:  # inside create()'s transaction this joins it
            row = await db.fetchone(
                f"SELECT * FROM concepts WHERE guild_id = ? AND token = ? COLLATE NOCASE AND {_LIVE}",
                (guild_id, token.strip()))
        return None if row is None else Concept.from_row(row)

    async def usable(self, guild_id: int, member_id: int) -> list[Concept]:
        """Concepts the member may put in a prompt: their own and shared ones, once ready."""
        return await self._select("guild_id = ? AND status = 'ready' AND (owner_id = ? OR shared = 1)",
                                  (guild_id, member_id))

    async def visible(self, guild_id: int, member_id: int, *, is_admin: bool = False) -> list[Concept]:
        """What the member may list: their own in any state and shared ready ones (an admin: all on the server)."""
        if is_admin:
            return await self._select(f"guild_id = ? AND {_LIVE}", (guild_id,))
        return await self._select(
            f"guild_id = ? AND {_LIVE} AND (owner_id = ? OR (shared = 1 AND status = 'ready'))",
            (guild_id, member_id))

    async def owned(self, guild_id: int, member_id: int) -> list[Concept]:
        return await self._select(f"guild_id = ? AND owner_id = ? AND {_LIVE}", (guild_id, member_id))

    async def _select(self, where: str, params: tuple) -> list[Concept]:
        async with self.store.read() as db:
            rows = await db.fetchall(f"SELECT * FROM concepts WHERE {where} ORDER BY token COLLATE NOCASE", params)
        return [Concept.from_row(row) for row in rows]

    # --- changes ----------------------------------------------------------------------------------------------------

    async def create(self, guild_id: int, owner_id: int, token: str, class_name: str,
                     style: bool = False, *, base_model: str | None = None,
                     base_family: str | None = None) -> Concept:
        """Register a concept in training and give it an empty directory.

        UserError if the token names another live concept on this server; a failed one of the same owner is
        replaced. What a token may be is checked before (trainer/intake/tokens.py); this only keeps it unique.
        """
        token, class_name = token.strip(), class_name.strip()
        if not token:
            raise UserError("The token is empty; pick a short made-up word such as sks or a nickname.")
        replaced: int | None = None
        async with self.store.immediate() as db:
            now = self.clock()
            existing = await self.by_token(guild_id, token)
            if existing is not None:
                if existing.owner_id == owner_id and existing.status == "failed":
                    replaced = existing.id
                    await db.execute("UPDATE concepts SET status = 'deleted', deleted_at = ?, updated_at = ?"
                                     " WHERE id = ?", (now, now, existing.id))
                elif existing.owner_id == owner_id:
                    raise UserError(f"You already have a concept called {existing.token}; use it, or delete it "
                                    "with /concepts first to train it again.")
                else:
                    raise UserError(f"The token {existing.token} is already taken on this server; "
                                    "pick another word.")
            await touch_member(db, guild_id, owner_id, now)
            concept_id = await db.insert(
                "INSERT INTO concepts (guild_id, owner_id, token, class_name, style, base_model, base_family,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (guild_id, owner_id, token, class_name, int(style), base_model, base_family, now, now))
            concept = await self.get(concept_id)
        if replaced is not None:
            await remove_tree(self.concept_dir(replaced))
        directory = self.concept_dir(concept_id)
        await remove_tree(directory)  # never inherit files from a database that was thrown away
        directory.mkdir(parents=True)
        return concept

    async def attach_job(self, concept_id: int, job_id: int, photo_count: int | None = None) -> None:
        """Link the training job (and record how many photos intake kept)."""
        await self.store.execute(
            f"UPDATE concepts SET job_id = ?, photo_count = COALESCE(?, photo_count), updated_at = ?"
            f" WHERE id = ? AND {_LIVE}", (job_id, photo_count, self.clock(), concept_id))

    async def set_shared(self, concept_id: int, member_id: int, shared: bool, *, is_admin: bool = False) -> Concept:
        async with self.store.immediate() as db:
            concept = await self._require(concept_id)
            if concept.owner_id != member_id and not (is_admin and not shared):
                raise PermissionDenied(f"{concept.token} belongs to someone else; only its owner can "
                                       + ("share it." if shared else "change its sharing."))
            if shared:
                self._require_made_up(concept.token)
            await db.execute("UPDATE concepts SET shared = ?, updated_at = ? WHERE id = ?",
                             (int(shared), self.clock(), concept_id))
            return await self.get(concept_id)

    async def delete(self, concept_id: int, member_id: int, *, is_admin: bool = False) -> Concept:
        """Mark the concept deleted (its token is free again), stop its training if any, and remove its files."""
        async with self.store.immediate() as db:
            concept = await self._require(concept_id)
            if concept.owner_id != member_id and not is_admin:
                raise PermissionDenied(f"{concept.token} belongs to someone else; only its owner or an admin can "
                                       "delete it.")
            await self._delete_in(db, concept, member_id, self.clock())
        await remove_tree(self.concept_dir(concept_id))
        return concept

    async def release(self, guild_id: int, token: str, by: int, reason: str = "") -> Concept:
        """An admin frees `token` on this server: the live concept holding it (anyone's, in any state) is deleted —
        its training stopped, its files removed — and the release is audit-logged. Returns that concept (its owner
        is to be told); NotFound when no concept holds the token."""
        async with self.store.immediate() as db:
            concept = await self.by_token(guild_id, token)
            if concept is None:
                raise NotFound(f"No concept on this server uses the token {token.strip()[:40]}; it is already free.")
            now = self.clock()
            await self._delete_in(db, concept, by, now)
            detail = (f"{concept.token} ({'shared' if concept.shared else 'private'}, {concept.status}, "
                      f"concept {concept.id})" + (f": {reason.strip()}" if reason.strip() else ""))
            await write_audit(db, guild_id, by, "release_token", f"member:{concept.owner_id}", detail, now)
        await remove_tree(self.concept_dir(concept.id))
        return concept

    async def _delete_in(self, db: Store, concept: Concept, by: int, now: float) -> None:
        if concept.job_id is not None:
            await cancel_job(db, concept.job_id, by, now)
        await db.execute("UPDATE concepts SET status = 'deleted', shared = 0, deleted_at = ?, updated_at = ?"
                         " WHERE id = ?", (now, now, concept.id))

    async def mark_ready(self, concept_id: int, lora_path: str, lora_kohya_path: str | None, *,
                         base_family: str | None = None) -> bool:
        """Training finished (`base_family`: the family of the model it ran on, as the worker reported it). False
        (and its files removed) if the concept was deleted meanwhile."""
        changed = await self.store.execute(
            "UPDATE concepts SET status = 'ready', lora_path = ?, lora_kohya_path = ?, error = NULL, updated_at = ?,"
            " base_family = COALESCE(?, base_family) WHERE id = ? AND status = 'training'",
            (lora_path, lora_kohya_path, self.clock(), base_family, concept_id))
        if not changed:
            await self._clean_if_gone(concept_id)
        return changed == 1

    async def remove_orphan_files(self) -> int:
        """Remove concept directories with no live concept and no running job (a worker may have written files
        after a delete). Call at start and now and then; returns how many went."""
        root = self.data_dir / "concepts"
        if not root.is_dir():
            return 0
        live = {row[0] for row in await self.store.fetchall(f"SELECT id FROM concepts WHERE {_LIVE}")}
        busy = {row[0] for row in await self.store.fetchall(
            "SELECT json_extract(params, '$.concept_id') FROM jobs WHERE kind = 'train' AND status = 'running'")}
        removed = 0
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) not in live | busy:
                await remove_tree(entry)
                removed += 1
        return removed

    async def _clean_if_gone(self, concept_id: int) -> None:
        if await self.get(concept_id) is None:
            await remove_tree(self.concept_dir(concept_id))

    def _require_made_up(self, token: str) -> None:
        """A shared token loads its LoRA for everyone who writes it, so only a made-up word may be shared (concepts
        trained before the token rules may hold a real word)."""
        vocab = tokens.model_vocab(self.model) if self.model else None
        try:
            tokens.check_token(token, vocab)
        except UserError:
            raise UserError(f"{token} can't be shared: it is an ordinary word, so your concept would turn up in the "
                            "prompts of everyone who writes it. Train it again under a made-up token such as "
                            f"{tokens.suggest_token(token, vocab)}, and share that one.") from None

    async def _require(self, concept_id: int) -> Concept:
        concept = await self.get(concept_id)
        if concept is None:
            raise NotFound("That concept does not exist (it may have been deleted).")
        return concept


async def remove_tree(path: Path) -> bool:
    """Remove a directory off the event loop (checkpoints can be many files)."""
    if not path.exists():
        return False
    await asyncio.to_thread(shutil.rmtree, path, onerror=_vanished_is_fine)
    return True


def _vanished_is_fine(function, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):  # someone else removed it first: fine; anything else: not
        raise exc_info[1]
