"""/queue: my jobs (place, ETA, cancel), and the admin subcommands that steer the queue (audit-logged)."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import BoothBot, is_admin
from bot.errors import NotFound, PermissionDenied, UserError
from cogs import _render
from cogs._base import BoothCog, services_of

LIMIT_CHOICES = [
    app_commands.Choice(name="jobs waiting per member", value="max_queued_jobs"),
    app_commands.Choice(name="trainings per member per day", value="trainings_per_day"),
]
SAFETY_CHOICES = [
    app_commands.Choice(name="on", value="on"),
    app_commands.Choice(name="off", value="off"),
    app_commands.Choice(name="the bot's default", value="default"),
]
ACTIVE = ("queued", "running")
CANCEL_ANSWERS = {
    "cancelled": "Job {id} is cancelled.",
    "requested": "Job {id} is running; it will stop at its next step.",
    "already requested": "Job {id} is already stopping.",
    "already finished": "Job {id} has already finished.",
}


DELIVERED_ELSEWHERE = {"dm": "sent to the owner by DM", "followup": "shown to the owner only",
                       "nowhere": "not delivered"}


def delivery_line(job) -> str:
    """One finished job whose outcome did not reach its channel, for admins."""
    if job.delivered_at is None:
        state = f"waiting to be retried (attempt {job.delivery_attempts + 1} next)"
    else:
        state = DELIVERED_ELSEWHERE.get(job.delivered_via or "", job.delivered_via or "delivered")
    return f"Job {job.id} ({job.kind}, <@{job.owner_id}>): {state}. Why: {job.delivery_error}"


LANE_STATES = {"starting": "⏳ starting", "ready": "🟢 ready", "busy": "🔵 busy", "restarting": "🔁 restarting",
               "down": "🔴 down"}


def lane_line(lane, job, guild_id: int) -> str:
    """One GPU worker lane for admins: label, state, device, current job (this server's only), jobs run."""
    parts = [f"**{lane.label}**: {LANE_STATES.get(lane.state, lane.state)}", f"device {lane.device}"]
    if lane.current_job_id is not None:
        if job is not None and job.guild_id == guild_id:
            parts.append(f"job {job.id} ({job.kind}, <@{job.owner_id}>)")
        else:
            parts.append("a job of another server")
    parts.append(f"{lane.jobs_run} job{'' if lane.jobs_run == 1 else 's'} run")
    line = " · ".join(parts)
    if lane.state == "down" and lane.problem:
        line += f"\n  why: {lane.problem}"
    return line


def require_admin(interaction: discord.Interaction) -> None:
    admin_role = services_of(interaction).settings.admin_role
    if not is_admin(interaction):
        role = f" or the {admin_role} role" if admin_role else ""
        raise PermissionDenied(f"Only server admins (Manage Server{role}) can use /queue admin. "
                               "Use /queue show to see your own jobs.")


async def _active_job_choices(interaction: discord.Interaction, current: str, *, everyone: bool):
    jobs = await services_of(interaction).ledger.list_jobs(guild_id=interaction.guild_id,
                                                           owner_id=None if everyone else interaction.user.id,
                                                           statuses=ACTIVE, limit=100)
    choices = []
    for job in jobs:
        label = f"{job.id}: {_render.job_title(job).replace('`', '')} ({job.status})"
        if current and current not in label.lower():
            continue
        choices.append(app_commands.Choice(name=label[:100], value=job.id))
    return choices[:25]


@app_commands.guild_only()
class Queue(BoothCog, commands.GroupCog, group_name="queue", group_description="See and manage the queue of jobs"):
    admin = app_commands.Group(name="admin", description="Server admins: steer the queue")

    async def _deliver_cancelled(self, guild_id: int) -> None:
        for job in await self.services.ledger.undelivered():
            if job.status == "cancelled" and job.guild_id == guild_id:
                await self.services.job_cancelled(job.id)

    # ----- everyone ----------------------------------------------------------------------------------------------
    @app_commands.command(name="show", description="Your jobs: place in the queue and when they should be done")
    async def show(self, interaction: discord.Interaction) -> None:
        entries = [e for e in await self.services.ledger.queue_view(interaction.guild_id)
                   if e.job.owner_id == interaction.user.id]
        lines = [_render.job_line(e.job, e.position, e.eta_s) for e in entries]
        if not lines:
            text = "You have no jobs waiting or running. Start one with /imagine or /train."
        else:
            text = "\n".join(lines) + "\n\nCancel one with `/queue cancel job:<number>`."
        if await self.services.admin.is_paused():
            text += "\n⏸️ The queue is paused by an admin; jobs wait until it is resumed."
        await interaction.response.send_message(text[:2000], ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel one of your jobs")
    @app_commands.describe(job="The job number (see /queue show)")
    async def cancel(self, interaction: discord.Interaction, job: app_commands.Range[int, 1]) -> None:
        existing = await self.services.ledger.get(job)
        if existing is None or existing.guild_id != interaction.guild_id:
            raise NotFound(f"There is no job {job} on this server. /queue show lists yours.")
        interaction.extras["job_id"] = job
        outcome = await self.services.ledger.cancel(job, interaction.user.id)
        await interaction.response.send_message(CANCEL_ANSWERS.get(outcome, outcome).format(id=job), ephemeral=True)
        await self.services.job_cancelled(job)

    @cancel.autocomplete("job")
    async def _cancel_choices(self, interaction: discord.Interaction, current: str):
        return await _active_job_choices(interaction, current.lower(), everyone=False)

    # ----- admins ------------------------------------------------------------------------------------------------
    @admin.command(name="list", description="Every job waiting or running on this server")
    async def admin_list(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        entries = await self.services.ledger.queue_view(interaction.guild_id)
        lines = [_render.job_line(e.job, e.position, e.eta_s, show_owner=True) for e in entries[:30]]
        if len(entries) > 30:
            lines.append(f"…and {len(entries) - 30} more.")
        text = "\n".join(lines) or "The queue is empty."
        problems = await self.services.ledger.delivery_problems(interaction.guild_id)
        if problems:
            text += "\n\nOutcomes that did not reach their channel:\n" + "\n".join(map(delivery_line, problems))
        if await self.services.admin.is_paused():
            text = "⏸️ Paused (running jobs finish; nothing new starts). `/queue admin resume` to go on.\n" + text
        await interaction.response.send_message(text[:2000], ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="workers", description="The GPU workers: state, device and the job each one runs")
    async def admin_workers(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        lines = []
        for lane in self.services.dispatcher.lane_statuses():
            job = None if lane.current_job_id is None else await self.services.ledger.get(lane.current_job_id)
            lines.append(lane_line(lane, job, interaction.guild_id))
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="pause", description="Stop starting new jobs (running ones finish)")
    async def admin_pause(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        changed = await self.services.admin.pause(interaction.user.id, guild_id=interaction.guild_id)
        await interaction.response.send_message(
            "The queue is paused: no new job starts until `/queue admin resume`." if changed
            else "The queue was already paused.", ephemeral=True)

    @admin.command(name="resume", description="Start jobs again after a pause")
    async def admin_resume(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        changed = await self.services.admin.resume(interaction.user.id, guild_id=interaction.guild_id)
        await interaction.response.send_message("The queue is running again." if changed
                                                else "The queue was not paused.", ephemeral=True)

    @admin.command(name="cancel", description="Cancel anyone's job")
    @app_commands.describe(job="The job number (see /queue admin list)")
    async def admin_cancel(self, interaction: discord.Interaction, job: app_commands.Range[int, 1]) -> None:
        require_admin(interaction)
        interaction.extras["job_id"] = job
        outcome = await self.services.admin.cancel(job, interaction.user.id, guild_id=interaction.guild_id)
        await interaction.response.send_message(CANCEL_ANSWERS.get(outcome, outcome).format(id=job), ephemeral=True)
        await self.services.job_cancelled(job)

    @admin_cancel.autocomplete("job")
    async def _admin_cancel_choices(self, interaction: discord.Interaction, current: str):
        if not is_admin(interaction):
            return []
        return await _active_job_choices(interaction, current.lower(), everyone=True)

    @admin.command(name="bump", description="Move a waiting job ahead of the same member's other jobs and ties")
    @app_commands.describe(job="The job number", amount="How much to raise its priority")
    async def admin_bump(self, interaction: discord.Interaction, job: app_commands.Range[int, 1],
                         amount: app_commands.Range[int, 1, 100] = 1) -> None:
        require_admin(interaction)
        interaction.extras["job_id"] = job
        bumped = await self.services.admin.bump(job, interaction.user.id, amount, guild_id=interaction.guild_id)
        position = await self.services.ledger.position(job)
        await interaction.response.send_message(
            f"Job {job} now has priority {bumped.priority}" + (f" and is #{position} in the queue." if position
                                                               else "."), ephemeral=True)

    @admin.command(name="clear", description="Cancel every waiting job on this server, or one member's")
    @app_commands.describe(member="Only this member's jobs")
    async def admin_clear(self, interaction: discord.Interaction, member: discord.User | None = None) -> None:
        require_admin(interaction)
        count = await self.services.admin.clear(interaction.user.id, interaction.guild_id,
                                                member.id if member else None)
        whose = f"{member.mention}'s" if member else "all"
        await interaction.response.send_message(f"Cancelled {count} waiting job(s) ({whose}); running jobs finish.",
                                                ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
        await self._deliver_cancelled(interaction.guild_id)

    @admin.command(name="limits", description="Show or set how many jobs members may queue or train")
    @app_commands.describe(name="Which limit", value="The new value (0 turns it off)",
                           role="Set it for members with this role (the most generous of a member's roles wins)",
                           reset="Go back to the default for this limit")
    @app_commands.choices(name=LIMIT_CHOICES)
    async def admin_limits(self, interaction: discord.Interaction, name: app_commands.Choice[str] | None = None,
                           value: app_commands.Range[int, 0, 1000] | None = None, role: discord.Role | None = None,
                           reset: bool = False) -> None:
        require_admin(interaction)
        admin = self.services.admin
        if name is not None and (value is not None or reset):
            await admin.set_limit(interaction.user.id, interaction.guild_id, name.value,
                                  None if reset else value, role.id if role else None)
        elif name is not None:
            raise UserError("Give a value to set that limit (or reset:True to go back to the default).")
        defaults = await admin.limits_for(interaction.guild_id)
        lines = [f"Server: {defaults['max_queued_jobs']} waiting job(s) per member, "
                 f"{defaults['trainings_per_day']} training(s) per member per day."]
        for row in await admin.limits(interaction.guild_id):
            if row["role_id"]:
                lines.append(f"<@&{row['role_id']}>: {row['name'].replace('_', ' ')} = {row['value']}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="safety", description="Show or set the safety filter for /imagine on this server")
    @app_commands.describe(state="on, off, or back to the bot's default (empty: show what it is)")
    @app_commands.choices(state=SAFETY_CHOICES)
    async def admin_safety(self, interaction: discord.Interaction,
                           state: app_commands.Choice[str] | None = None) -> None:
        require_admin(interaction)
        admin = self.services.admin
        if state is None:
            on = await admin.safety_for(interaction.guild_id)
        else:
            chosen = {"on": True, "off": False, "default": None}[state.value]
            on = await admin.set_safety(interaction.user.id, interaction.guild_id, chosen)
        lines = [f"The safety filter is **{'on' if on else 'off'}** for /imagine on this server"
                 + (" (the bot's default)." if state is not None and state.value == "default" else ".")]
        if on:
            lines.append("Images the base model's safety checker flags are held back (the member is told). Jobs "
                         "already waiting keep the setting they were queued with.")
            if (self.services.worker.ready_info or {}).get("safety_checker") is False:
                lines.append("⚠️ The bot's base model has no safety checker, so /imagine is refused on this server "
                             "while the filter is on. Turn it off with `/queue admin safety state:off`, or ask the "
                             "bot's operator for a base model that includes one.")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @admin.command(name="models", description="The base models this bot has, and this server's default")
    async def admin_models(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        models = self.services.base_models
        server_default = await models.default_for(interaction.guild_id)
        lines = [_render.base_model_line(model, server_default=server_default,
                                         bot_default=self.services.settings.default_model_name)
                 for model in models.listing()]
        stored = await models.stored_default(interaction.guild_id)
        if stored and not models.offered(stored):
            lines.append(f"⚠️ This server chose {stored}, which the bot no longer has; {server_default} is used "
                         "instead.")
        lines.append("\n/train uses this server's default; /imagine with a concept uses the model it was trained "
                     "on. Change the default with `/queue admin model name:`.")
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @admin.command(name="model", description="Pick this server's default base model for /train and /imagine")
    @app_commands.describe(name="The base model (see /queue admin models); empty: back to the bot's default")
    async def admin_model(self, interaction: discord.Interaction,
                          name: app_commands.Range[str, 1, 100] | None = None) -> None:
        require_admin(interaction)
        chosen = await self.services.base_models.set_default(interaction.user.id, interaction.guild_id, name)
        model = self.services.base_models.get(chosen)
        what = model.label() if model else chosen
        await interaction.response.send_message(
            f"This server's default base model is now **{what}**: new /train jobs use it, and so does /imagine "
            "without a concept. Concepts keep the model they were trained on.", ephemeral=True)

    @admin_model.autocomplete("name")
    async def _model_choices(self, interaction: discord.Interaction, current: str):
        if not is_admin(interaction):
            return []
        current = current.strip().lower()
        return [app_commands.Choice(name=model.label()[:100], value=model.name)
                for model in self.services.base_models.listing() if current in model.name][:25]

    @admin.command(name="ban", description="Stop a member from using the bot on this server")
    @app_commands.describe(member="Who", reason="Why (shown to them)")
    async def admin_ban(self, interaction: discord.Interaction, member: discord.User,
                        reason: app_commands.Range[str, 0, 200] = "") -> None:
        require_admin(interaction)
        await self.services.admin.ban(interaction.user.id, interaction.guild_id, member.id, reason)
        await interaction.response.send_message(
            f"{member.mention} can no longer queue jobs here. Their waiting jobs stay; "
            f"`/queue admin clear member:` removes them.", ephemeral=True,
            allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="unban", description="Let a banned member use the bot again")
    async def admin_unban(self, interaction: discord.Interaction, member: discord.User) -> None:
        require_admin(interaction)
        removed = await self.services.admin.unban(interaction.user.id, interaction.guild_id, member.id)
        await interaction.response.send_message(
            f"{member.mention} can use the bot again." if removed else f"{member.mention} was not banned.",
            ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    @admin.command(name="audit", description="The latest admin actions on this server")
    async def admin_audit(self, interaction: discord.Interaction) -> None:
        require_admin(interaction)
        rows = await self.services.admin.audit(interaction.guild_id, limit=20)
        lines = [f"<t:{int(r['created_at'])}:R> <@{r['by']}> {r['action']} {r['target']} {r['detail']}".rstrip()
                 for r in rows]
        await interaction.response.send_message(("\n".join(lines) or "No admin actions yet.")[:2000],
                                                ephemeral=True, allowed_mentions=discord.AllowedMentions.none())


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Queue(bot))
