"""How jobs, concepts and reports look in Discord: plain functions from service objects to text and embeds."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import discord

from bot.jobs.kinds import JobKind
from trainer.contract.durations import format_duration

COLOR_QUEUED = discord.Colour.light_grey()
COLOR_RUNNING = discord.Colour.blurple()
COLOR_DONE = discord.Colour.green()
COLOR_FAILED = discord.Colour.red()
COLOR_INFO = discord.Colour.teal()
BAR_WIDTH = 16
CONCEPT_STATES = {"ready": "ready", "training": "training…", "failed": "training failed"}


def progress_bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    total = max(total, 1)
    step = min(max(step, 0), total)
    filled = int(round(width * step / total))
    return "▰" * filled + "▱" * (width - filled) + f" {int(100 * step / total)}%"


@dataclass(frozen=True)
class KindLook:
    """How jobs of one kind read in Discord."""
    title: Callable[[dict], str]  # from the job's params
    noun: str  # "your {noun} job 12 failed"
    preview: str  # what its progress image shows


def _train_title(params: dict) -> str:
    return f"Training `{params.get('token', '?')}` ({params.get('class_name', '?')})"


def _imagine_title(params: dict) -> str:
    prompt = str(params.get("prompt", ""))
    return f"Imagining “{prompt[:80]}{'…' if len(prompt) > 80 else ''}”"


KIND_LOOKS = {
    JobKind.TRAIN: KindLook(_train_title, noun="training", preview="sample preview"),
    JobKind.IMAGINE: KindLook(_imagine_title, noun="image", preview="preview"),
}


def kind_look(job) -> KindLook:
    return KIND_LOOKS.get(job.kind) or KindLook(lambda params: f"A {job.kind} job", noun=job.kind, preview="preview")


def job_title(job) -> str:
    return kind_look(job).title(job.params or {})


def queued_embed(job, position: int | None, eta_s: float | None, *, paused: bool = False) -> discord.Embed:
    embed = discord.Embed(title=job_title(job), colour=COLOR_QUEUED)
    where = f"#{position} in the queue" if position else "in the queue"
    embed.description = f"<@{job.owner_id}>'s job {job.id} is {where}."
    if eta_s is not None:
        embed.description += f" It should be done in about {format_duration(eta_s)}."
    if paused:
        embed.description += "\nThe queue is paused by an admin; it will go on when they resume it."
    embed.set_footer(text=f"job {job.id} · /queue cancel to cancel it")
    return embed


def running_embed(job, event: dict, *, preview_name: str | None = None) -> discord.Embed:
    step, total = int(event.get("step") or 0), int(event.get("total") or 0)
    embed = discord.Embed(title=job_title(job), colour=COLOR_RUNNING)
    lines = [progress_bar(step, total)]
    if event.get("stage") != "class_images":  # those count images, and their detail says so
        lines.append(f"step {step}/{total}")
    if event.get("eta_s") is not None:
        lines[-1] += f" · about {format_duration(event['eta_s'])} left"
    if event.get("detail"):  # what the engine is doing besides steps, e.g. "making class images 20/100"
        lines.append(str(event["detail"])[:200])
    embed.description = "\n".join(lines)
    if preview_name:
        embed.set_image(url=f"attachment://{preview_name}")
    what = kind_look(job).preview
    embed.set_footer(text=f"job {job.id} · {what} updates as it runs")
    return embed


def failed_text(job) -> str:
    what = kind_look(job).noun
    if job.status == "cancelled":
        return f"<@{job.owner_id}> your {what} job {job.id} was cancelled."
    if job.status == "interrupted":
        return (f"<@{job.owner_id}> your {what} job {job.id} was interrupted by a bot restart. "
                "Please run the command again.")
    reason = job.error or "something went wrong"
    return f"<@{job.owner_id}> your {what} job {job.id} failed: {reason}"


def train_done_text(job, result: dict) -> str:
    params = job.params or {}
    token, class_name = params.get("token", "?"), params.get("class_name", "?")
    subject = f"{token} {class_name}" if not params.get("style") else f"{token} style"
    example = (f"a photo of {subject} as an astronaut" if not params.get("style")
               else f"a lighthouse in {subject}")
    steps, seconds = result.get("steps"), result.get("seconds")
    took = f" ({steps} steps in {format_duration(seconds)})" if steps is not None and seconds is not None else ""
    return (f"<@{job.owner_id}> `{token}` is ready{took}. Here are a few samples.\n"
            f"Use it: `/imagine prompt: {example}`\n"
            f"It is private to you; `/concepts share {token}` lets everyone here use it, "
            f"`/concepts export {token}` sends you the LoRA file.")


def imagine_done_text(job, result: dict) -> str:
    params = job.params or {}
    seeds = result.get("seeds") or []
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else (f"seeds {', '.join(map(str, seeds))}" if seeds else "")
    lines = [f"<@{job.owner_id}> “{params.get('prompt', '')}”" + (f" · {seed_text}" if seed_text else "")]
    for notice in result.get("notices") or []:
        lines.append(f"ℹ️ {notice}")
    if result.get("blocked"):
        lines.append(f"{len(result['blocked'])} image(s) were held back by the safety filter.")
    return "\n".join(lines)[:2000]


def intake_embed(report_text: str, *, token: str, accepted: int, ok: bool) -> discord.Embed:
    embed = discord.Embed(title=f"Photos for `{token}`", colour=COLOR_DONE if ok else COLOR_FAILED)
    embed.description = report_text[:4000]
    if ok:
        embed.set_footer(text=f"{accepted} photo(s) will be used for training")
    return embed


def concept_line(concept, member_id: int, model: str | None = None) -> str:
    """`model`: the base model it was trained on (services.base_models.model_of)."""
    owner = "yours" if concept.owner_id == member_id else f"shared by <@{concept.owner_id}>"
    state = CONCEPT_STATES.get(concept.status, concept.status)
    shared = ", shared" if concept.shared and concept.owner_id == member_id else ""
    kind = " (style)" if concept.style else ""
    on_model = f" · on {model}" if model else ""
    return f"`{concept.token}` — {concept.class_name}{kind}{on_model} · {state} · {owner}{shared}"


def using_model_line(params: dict) -> str:
    """What an /imagine with concepts says about its base model: "Using pony — squidarth was trained on it."."""
    tokens = params.get("model_for") or []
    if not tokens or not params.get("model"):
        return ""
    verb = "was" if len(tokens) == 1 else "were"
    return f"Using {params['model']} — {', '.join(tokens)} {verb} trained on it."


def base_model_line(model, *, server_default: str, bot_default: str) -> str:
    """One base model for /queue admin models: name, family, where from, loaded or not, and any problem."""
    family = model.family.label if model.family else "family not known yet"
    marks = [mark for mark, on in (("this server's default", model.name == server_default),
                                   ("the bot's default", model.name == bot_default)) if on]
    state = "loaded on the GPU" if model.resident else "not loaded (loads at its first job)"
    line = f"**{model.name}** — {family} · `{model.ref}` · {state}" + (f" · {', '.join(marks)}" if marks else "")
    if model.problem:
        line += f"\n  ⚠️ can't be used: {model.problem[:300]}"
    return line


def photos_text(concept) -> str:
    """How many photos trained it, and whether the bot still keeps them (photo retention deletes them)."""
    deleted_at = getattr(concept, "photos_deleted_at", None)
    if deleted_at is None:
        return str(concept.photo_count)
    return f"{concept.photo_count}, deleted <t:{int(deleted_at)}:R> after the training (the LoRA stays)"


def concept_embed(concept, member_id: int, model: str | None = None) -> discord.Embed:
    embed = discord.Embed(title=f"`{concept.token}`", colour=COLOR_INFO,
                          description=concept_line(concept, member_id, model))
    embed.add_field(name="Class", value=concept.class_name)
    if model:
        embed.add_field(name="Base model", value=model)
    embed.add_field(name="Photos", value=photos_text(concept))
    embed.add_field(name="Shared", value="yes" if concept.shared else "no")
    if concept.status == "ready":
        subject = f"{concept.token} {concept.class_name}" if not concept.style else f"{concept.token} style"
        embed.add_field(name="Use it", value=f"`/imagine prompt: a photo of {subject}`", inline=False)
    elif concept.status == "failed":
        why = getattr(concept, "error", None) or "the training did not finish"
        embed.add_field(name="Training failed", inline=False,
                        value=f"{why[:900]}\nRun /train with the same token and your photos to try again.")
    return embed


def job_line(job, position: int | None = None, eta_s: float | None = None, *, show_owner: bool = False) -> str:
    owner = f" · <@{job.owner_id}>" if show_owner else ""
    if job.status == "queued":
        where = f"#{position}" if position else "queued"
        when = f", done in ~{format_duration(eta_s)}" if eta_s is not None else ""
        state = f"{where}{when}"
    elif job.status == "running":
        total = job.progress_total or 0
        state = f"running {progress_bar(job.progress_step or 0, total, 8)}" if total else "running"
    else:
        state = job.status
    return f"**{job.id}** {job_title(job)} — {state}{owner}"


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
