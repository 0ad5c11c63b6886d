"""Buttons. The ones on results are persistent: their custom_id carries the job id, so they keep working after a
restart (registered with `bot.add_dynamic_items` when cogs.imagine loads). The confirmation view is short-lived."""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import discord

from bot.client import answer_error
from bot.errors import NotFound
from bot.jobs.kinds import JobKind
from cogs._base import services_of
from cogs._parameters import visible_parameters
from cogs._imagine_jobs import queue_again

log = logging.getLogger(__name__)
MAX_VARIATION_BUTTONS = 4


async def _guarded(interaction: discord.Interaction, handler: Callable[[], Awaitable[None]]) -> None:
    try:
        await handler()
    except Exception as error:  # noqa: BLE001 - answer_error tells the member and logs bugs
        await answer_error(interaction, error)


async def _imagine_job(interaction: discord.Interaction, job_id: int):
    job = await services_of(interaction).ledger.get(job_id)
    if job is None or job.kind != JobKind.IMAGINE or job.guild_id != interaction.guild_id or job.result is None:
        raise NotFound("Those images are no longer available (they may have been deleted with /forget). "
                       "Use /imagine to make new ones.")
    return job


async def _queue_again(interaction: discord.Interaction, job_id: int, *, variation_of: int | None) -> None:
    """Re-roll (new seed) or vary one image of an earlier /imagine result, as the member who clicked."""
    job = await _imagine_job(interaction, job_id)
    interaction.extras["job_id"] = job.id
    await queue_again(interaction, job, variation_of=variation_of)


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"bb:reroll:(?P<job_id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Re-roll", emoji="🎲", style=discord.ButtonStyle.primary,
                                           custom_id=f"bb:reroll:{job_id}", row=0))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _guarded(interaction, lambda: _queue_again(interaction, self.job_id, variation_of=None))


class VaryButton(discord.ui.DynamicItem[discord.ui.Button], template=r"bb:vary:(?P<job_id>\d+):(?P<index>\d+)"):
    def __init__(self, job_id: int, index: int) -> None:
        super().__init__(discord.ui.Button(label=f"V{index + 1}", style=discord.ButtonStyle.secondary,
                                           custom_id=f"bb:vary:{job_id}:{index}", row=1))
        self.job_id, self.index = job_id, index

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(int(match["job_id"]), int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await _guarded(interaction, lambda: _queue_again(interaction, self.job_id, variation_of=self.index))


class ParamsButton(discord.ui.DynamicItem[discord.ui.Button], template=r"bb:params:(?P<job_id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Parameters", emoji="ℹ️", style=discord.ButtonStyle.secondary,
                                           custom_id=f"bb:params:{job_id}", row=0))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        async def run():
            job = await _imagine_job(interaction, self.job_id)
            concepts = services_of(interaction).concepts
            text = await visible_parameters(
                (job.result or {}).get("parameters") or "(no parameters were recorded)",
                viewer_id=interaction.user.id, owner_id=job.owner_id,
                concept_by_token=lambda token: concepts.by_token(job.guild_id, token))
            seeds = (job.result or {}).get("seeds") or []
            extra = f"\nseeds: {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
            await interaction.response.send_message(f"Job {job.id}:\n```\n{text[:1800]}\n```{extra}", ephemeral=True)
        await _guarded(interaction, run)


DYNAMIC_ITEMS = (RerollButton, VaryButton, ParamsButton)


def result_view(job_id: int, image_count: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerollButton(job_id))
    view.add_item(ParamsButton(job_id))
    for index in range(min(image_count, MAX_VARIATION_BUTTONS)):
        view.add_item(VaryButton(job_id, index))
    return view


class ConfirmView(discord.ui.View):
    """Confirm / Keep buttons only the member who asked can press; `confirmed` is set when they choose."""

    def __init__(self, member_id: int, *, confirm_label: str, timeout: float = 120.0) -> None:
        super().__init__(timeout=timeout)
        self.member_id = member_id
        self.confirmed: bool | None = None
        self.interaction: discord.Interaction | None = None
        self.confirm.label = confirm_label

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.member_id:
            await interaction.response.send_message("This button is not for you.", ephemeral=True)
            return False
        return True

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.confirmed, self.interaction = True, interaction
        self.stop()

    @discord.ui.button(label="Keep everything", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.confirmed, self.interaction = False, interaction
        self.stop()

    async def on_error(self, interaction: discord.Interaction, error: Exception, item) -> None:
        await answer_error(interaction, error)


async def ask_to_confirm(interaction: discord.Interaction, question: str, *, confirm_label: str,
                         working: str) -> discord.Interaction | None:
    """Ask the member (ephemerally) with Confirm / Keep buttons. On Confirm the message shows `working` and the
    button's interaction is returned, to edit with the outcome; on Keep or no answer it says nothing was deleted
    and None is returned."""
    view = ConfirmView(interaction.user.id, confirm_label=confirm_label)
    await interaction.response.send_message(question, view=view, ephemeral=True)
    if await view.wait() or not view.confirmed:
        answer = "Nothing was deleted." if view.confirmed is False else "No answer, so nothing was deleted."
        if view.interaction is not None:
            await view.interaction.response.edit_message(content=answer, view=None)
        else:
            await interaction.edit_original_response(content=answer, view=None)
        return None
    await view.interaction.response.edit_message(content=working, view=None)
    return view.interaction
