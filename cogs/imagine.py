"""/imagine: generate images from a prompt (with the member's own and shared concepts), plus the result buttons."""
from __future__ import annotations

import discord
from discord import app_commands

from bot.client import BoothBot
from cogs import _render
from cogs._base import BoothCog
from cogs._imagine_jobs import queue_imagine
from cogs._views import DYNAMIC_ITEMS
from trainer.contract.aspects import ASPECTS, label
from trainer.contract.imagine_request import (CFG_RANGE, COUNT_RANGE, DEFAULT_COUNT, MEMBER_PROMPT_CHARS, SEED_MAX,
                                              STEPS_RANGE)

# Shape names, not pixel sizes: Discord fixes choices when commands sync, and the pixels depend on the model family
# (SD 1.x portrait 512×768, SDXL 896×1152); the bot turns the name into the family's size at submit.
SIZE_CHOICES = [app_commands.Choice(name=label(aspect), value=aspect) for aspect in ASPECTS]


class Imagine(BoothCog):
    async def cog_load(self) -> None:
        # Persistent result buttons: their custom_id names the job, so they work for messages sent before a restart.
        self.bot.add_dynamic_items(*DYNAMIC_ITEMS)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*DYNAMIC_ITEMS)

    @app_commands.command(name="imagine", description="Make images from a prompt; your trained tokens work in it.")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What to draw, e.g. a photo of squidarth man as an astronaut",
        negative="What to keep out of the picture, e.g. blurry, text",
        seed="A number to repeat a result exactly (random if empty)",
        steps="Denoising steps (more = finer, slower)",
        cfg="How strictly to follow the prompt (7 is a good start)",
        size="Picture shape (the pixels follow the bot's model)",
        count="How many images",
    )
    @app_commands.choices(size=SIZE_CHOICES)
    async def imagine(self, interaction: discord.Interaction,
                      prompt: app_commands.Range[str, 1, MEMBER_PROMPT_CHARS],
                      negative: app_commands.Range[str, 0, MEMBER_PROMPT_CHARS] | None = None,
                      seed: app_commands.Range[int, 0, SEED_MAX] | None = None,
                      steps: app_commands.Range[int, *STEPS_RANGE] | None = None,
                      cfg: app_commands.Range[float, *CFG_RANGE] | None = None,
                      size: app_commands.Choice[str] | None = None,
                      count: app_commands.Range[int, *COUNT_RANGE] = DEFAULT_COUNT) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await queue_imagine(interaction, prompt=prompt, negative=negative or "", seed=seed, steps=steps,
                                  cfg=cfg, size=size.value if size is not None else None, count=count)
        using = _render.using_model_line(job.params)
        await interaction.followup.send(f"Queued as job {job.id}; your images will show up in this channel."
                                        + (f"\n{using}" if using else ""), ephemeral=True)


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Imagine(bot))
