"""/concepts: list, inspect, share, unshare, delete and export trained concepts. Owner-only unless shared; an admin
can also release a token (the concept holding it is deleted and its owner told)."""
from __future__ import annotations

from pathlib import Path

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import BoothBot, is_admin
from bot.errors import NotFound, PermissionDenied, UserError
from bot.services.concepts import Concept, ConceptService
from cogs import _render
from cogs._base import BoothCog, services_of
from cogs._views import ask_to_confirm
from trainer.intake.tokens import suggest_token

MAX_CHOICES = 25


def _is_admin(interaction: discord.Interaction) -> bool:
    return is_admin(interaction)


async def _choices(interaction: discord.Interaction, current: str, *, own_only: bool):
    """Only concepts this member may use (or, for changes, owns); filtered by what they typed; at most 25."""
    concepts = services_of(interaction).concepts
    if own_only:
        found = await concepts.owned(interaction.guild_id, interaction.user.id)
    else:
        found = await concepts.visible(interaction.guild_id, interaction.user.id)
    return _matching(found, current)


def _matching(found: list[Concept], current: str) -> list[app_commands.Choice]:
    current = current.strip().lower()
    matches = [c for c in found if current in c.token.lower()]
    matches.sort(key=lambda c: (not c.token.lower().startswith(current), c.token.lower()))
    return [app_commands.Choice(name=f"{c.token} ({c.class_name}, {c.status})"[:100], value=c.token)
            for c in matches[:MAX_CHOICES]]


@app_commands.guild_only()
class Concepts(BoothCog, commands.GroupCog, group_name="concepts", group_description="Your trained concepts"):
    @property
    def service(self) -> ConceptService:
        return self.services.concepts

    async def _find(self, interaction: discord.Interaction, token: str):
        """The concept called `token` if this member may see it; the same answer whether it is missing or private."""
        concept = await self.service.by_token(interaction.guild_id, token)
        member = interaction.user.id
        if concept is None or not (concept.owner_id == member or (concept.shared and concept.status == "ready")
                                   or _is_admin(interaction)):
            raise NotFound(f"You have no concept called {token} (and none is shared under that name). "
                           "/concepts list shows the ones you can use.")
        return concept

    @app_commands.command(name="list", description="The concepts you can use: yours and shared ones")
    async def list_(self, interaction: discord.Interaction) -> None:
        concepts = await self.service.visible(interaction.guild_id, interaction.user.id)
        if not concepts:
            text = ("You have no concepts yet. Train one with `/train token:<word> class:<man|woman|dog|…>` "
                    "and photos.")
        else:
            model_of = self.services.base_models.model_of
            text = "\n".join(_render.concept_line(c, interaction.user.id, model_of(c)) for c in concepts[:40])
            if len(concepts) > 40:
                text += f"\n…and {len(concepts) - 40} more."
        await interaction.response.send_message(text[:2000], ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="info", description="Details of one concept and how to use it")
    @app_commands.describe(concept="The concept's token")
    async def info(self, interaction: discord.Interaction, concept: str) -> None:
        found = await self._find(interaction, concept)
        model = self.services.base_models.model_of(found)
        await interaction.response.send_message(embed=_render.concept_embed(found, interaction.user.id, model),
                                                ephemeral=True)

    @app_commands.command(name="share", description="Let everyone on this server use one of your concepts")
    @app_commands.describe(concept="The concept's token")
    async def share(self, interaction: discord.Interaction, concept: str) -> None:
        found = await self._find(interaction, concept)
        await self.service.set_shared(found.id, interaction.user.id, True)
        await interaction.response.send_message(
            f"`{found.token}` is now shared: everyone here can use it in /imagine. "
            f"`/concepts unshare {found.token}` makes it private again.", ephemeral=True)

    @app_commands.command(name="unshare", description="Make one of your concepts private again")
    @app_commands.describe(concept="The concept's token")
    async def unshare(self, interaction: discord.Interaction, concept: str) -> None:
        found = await self._find(interaction, concept)
        await self.service.set_shared(found.id, interaction.user.id, False, is_admin=_is_admin(interaction))
        await interaction.response.send_message(f"`{found.token}` is private again: only its owner can use it.",
                                                ephemeral=True)

    @app_commands.command(name="delete", description="Delete one of your concepts and its files")
    @app_commands.describe(concept="The concept's token")
    async def delete(self, interaction: discord.Interaction, concept: str) -> None:
        found = await self._find(interaction, concept)
        admin = _is_admin(interaction)
        if found.owner_id != interaction.user.id and not admin:
            raise PermissionDenied(f"`{found.token}` belongs to someone else; only its owner or an admin can "
                                   "delete it.")
        confirmed = await ask_to_confirm(
            interaction,
            f"Delete `{found.token}` for good? Its LoRA, samples and photos are removed and the token becomes free.",
            confirm_label=f"Delete {found.token}", working=f"Deleting `{found.token}`…")
        if confirmed is None:
            return
        deleted = await self.service.delete(found.id, interaction.user.id, is_admin=admin)
        await confirmed.edit_original_response(content=f"`{deleted.token}` is deleted.")
        if deleted.job_id is not None:
            await self.services.job_cancelled(deleted.job_id)

    @app_commands.command(name="export", description="Get one of your concepts as a LoRA file (A1111/ComfyUI format)")
    @app_commands.describe(concept="The concept's token")
    async def export(self, interaction: discord.Interaction, concept: str) -> None:
        found = await self._find(interaction, concept)
        # Not admins either: the file is the member's likeness, and admins may not use private concepts in the bot.
        if found.owner_id != interaction.user.id:
            raise PermissionDenied(f"Only the owner of `{found.token}` can export it.")
        if found.status != "ready":
            raise UserError(f"`{found.token}` is {found.status}; it can be exported once training has finished.")
        path = Path(found.lora_kohya_path or found.lora_path or "")
        if not path.is_file():
            raise NotFound(f"The file of `{found.token}` is missing on the bot's machine; ask an admin.")
        size, limit = path.stat().st_size, interaction.filesize_limit
        if size > limit:
            await interaction.response.send_message(
                f"`{found.token}`'s LoRA is {size / 1024 / 1024:.1f} MB, more than Discord lets me upload here "
                f"({limit / 1024 / 1024:.0f} MB). An admin can copy it from the bot's machine: `{path}`",
                ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(
            f"`{found.token}` as a LoRA ({'kohya/A1111' if found.lora_kohya_path else 'diffusers'} format). "
            f"Put it in your LoRA folder and use `<lora:{found.token}:1> {found.token} {found.class_name}` in a "
            "prompt.", file=discord.File(path, filename=f"{found.token}.safetensors"), ephemeral=True)

    @app_commands.command(name="release", description="Server admins: free a token (deletes the concept using it)")
    @app_commands.describe(token="The token to free", reason="Why (told to the concept's owner)")
    async def release(self, interaction: discord.Interaction, token: str,
                      reason: app_commands.Range[str, 0, 200] = "") -> None:
        if not _is_admin(interaction):
            raise PermissionDenied("Only server admins can release a token.")
        found = await self.service.by_token(interaction.guild_id, token)
        if found is None:
            raise NotFound(f"No concept on this server uses the token {token.strip()[:40]}; it is already free.")
        confirmed = await ask_to_confirm(
            interaction,
            f"Release `{found.token}`? <@{found.owner_id}>'s concept `{found.token}` "
            f"({'shared' if found.shared else 'private'}, {_render.CONCEPT_STATES.get(found.status, found.status)}) "
            "is deleted for good, with its LoRA, samples and photos, and they are told.",
            confirm_label=f"Release {found.token}", working=f"Releasing `{found.token}`…")
        if confirmed is None:
            return
        released = await self.service.release(interaction.guild_id, found.token, interaction.user.id, reason)
        told = await self._tell_owner(released, interaction, reason)
        stopped = ", its training stopped," if released.status == "training" else ""
        await confirmed.edit_original_response(
            content=f"`{released.token}` is free: <@{released.owner_id}>'s concept was deleted{stopped} and the "
                    "release is in `/queue admin audit`. "
                    + ("They were told by direct message." if told else
                       "I couldn't message them (their DMs may be closed); please let them know."),
            allowed_mentions=discord.AllowedMentions.none())
        if released.job_id is not None:
            await self.services.job_cancelled(released.job_id)

    async def _tell_owner(self, concept: Concept, interaction: discord.Interaction, reason: str) -> bool:
        why = f" The reason given: {reason.strip()}" if reason.strip() else ""
        text = (f"An admin of {interaction.guild.name if interaction.guild else 'the server'} released the token "
                f"`{concept.token}`, so your concept `{concept.token}` was deleted.{why} You can train it again "
                f"with a made-up token, e.g. `/train token:{suggest_token(concept.token)} class:{concept.class_name}`.")
        try:
            owner = self.bot.get_user(concept.owner_id) or await self.bot.fetch_user(concept.owner_id)
            await owner.send(text[:2000])
        except discord.HTTPException:
            return False
        return True

    @info.autocomplete("concept")
    async def _usable_choices(self, interaction: discord.Interaction, current: str):
        return await _choices(interaction, current, own_only=False)

    @share.autocomplete("concept")
    @unshare.autocomplete("concept")
    @delete.autocomplete("concept")
    @export.autocomplete("concept")
    async def _own_choices(self, interaction: discord.Interaction, current: str):
        return await _choices(interaction, current, own_only=True)

    @release.autocomplete("token")
    async def _release_choices(self, interaction: discord.Interaction, current: str):
        if not _is_admin(interaction):  # nobody else may learn which tokens private concepts use
            return []
        return _matching(await self.service.visible(interaction.guild_id, interaction.user.id, is_admin=True),
                         current)


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Concepts(bot))
