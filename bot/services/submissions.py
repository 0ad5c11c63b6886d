"""Turning a member's request into a queued job: every check, in the order that spares the member wasted uploads.

The cogs call these so they stay thin: parse the interaction, call `submit_training` / `submit_imagine`, render.
Everything a member can get wrong raises a UserError subclass whose text says what to do next.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bot.app import Services
from bot.errors import UserError
from bot.jobs.ledger import Job
from bot.services.photo_intake import intake_workspace, take_in_photos
from trainer.contract.aspects import size_for
from trainer.contract.families import SD1, family_named
from trainer.contract.imagine_request import NO_SAFETY_CHECKER, DEFAULT_STRENGTH, ImagineRequest, check_size
from trainer.contract.train_spec import checked_params
from trainer.intake import photos as intake  # torch-free: PIL and OpenCV
from trainer.intake import tokens

log = logging.getLogger(__name__)

MAX_ZIP_MB = 200
VARIATION_STRENGTH = DEFAULT_STRENGTH
# Recipe fields of trainer.contract.train_spec.TrainSpec added to every training's params; empty means the trainer's
# defaults. A seam for an operator setting later; the wire tests use it to keep tiny-model trainings to seconds.
TRAIN_RECIPE: dict = {}


async def check_training(services: Services, *, guild_id: int, member_id: int, role_ids: Iterable[int], token: str,
                         class_name: str, style: bool, options: Mapping[str, object] | None = None):
    """Everything about a /train that needs no photos: ban and limits, options, token and class spelling, the token
    free on this server. The cog calls it before downloading anything; `submit_training` calls it again. Returns the
    normalised (token, class_name, style, recipe)."""
    await services.ledger.check_submit("train", member_id, guild_id, role_ids=list(role_ids))
    recipe = {**checked_params(TRAIN_RECIPE), **checked_params(options or {}, by_member=True)}
    model = await training_model(services, guild_id)
    token = tokens.check_token(token, tokens.model_vocab(model.ref))
    class_name = intake.normalise_class(class_name)
    style = bool(style) or intake.class_kind(class_name) == "style"
    existing = await services.concepts.by_token(guild_id, token)
    if existing is not None and not (existing.owner_id == member_id and existing.status == "failed"):
        if existing.owner_id == member_id:
            raise UserError(f"You already have a concept called {existing.token}. Use it, or delete it with "
                            f"`/concepts delete {existing.token}` to train it again.")
        raise UserError(f"The token {existing.token} is already taken on this server; pick another made-up word.")
    return token, class_name, style, recipe


async def training_model(services: Services, guild_id: int):
    """The base model a /train on this server uses (the server's default); UserError when the worker found it
    unusable (its files missing or of an unsupported kind)."""
    model = await services.base_models.for_training(guild_id)
    if model.problem:
        raise UserError(f"This server's base model {model.name} can't be used right now, so training can't start: "
                        f"{model.problem[:600]}. An admin can pick another one with `/queue admin model`.")
    return model


async def submit_training(services: Services, *, guild_id: int, member_id: int, channel_id: int | None,
                          role_ids: Iterable[int], token: str, class_name: str, style: bool,
                          files: Sequence[tuple[str, bytes | Path]], options: Mapping[str, object] | None = None):
    """Check, take in the photos, create the concept and queue its training. Returns (Job, IntakeReport).

    `files`: (name shown to the member, bytes or the path of the saved upload).
    `options`: the TrainSpec fields the member chose (those members may set, e.g. steps), None for the default.
    Order: ban and limits (cheap, before any photo work) → options, token and class spelling → token free on this
    server → photo intake (in a child process with its own memory limit: bot/services/photo_intake.py) → concept +
    photos on disk → ledger.
    If queueing fails after the concept was created, the concept is removed again.
    """
    settings = services.settings
    role_ids = list(role_ids)
    token, class_name, style, recipe = await check_training(services, guild_id=guild_id, member_id=member_id,
                                                            role_ids=role_ids, token=token,
                                                            class_name=class_name, style=style, options=options)

    limits = intake.IntakeLimits(min_photos=settings.min_photos, max_photos=settings.max_photos,
                                 max_photo_bytes=settings.max_photo_mb * 1024 * 1024,
                                 resolution=photo_resolution(services.worker and services.worker.ready_info))
    async with intake_workspace(settings.data_dir) as work_dir:
        return await _take_in_and_queue(services, work_dir, guild_id=guild_id, member_id=member_id,
                                        channel_id=channel_id, role_ids=role_ids, token=token, class_name=class_name,
                                        style=style, files=files, limits=limits, recipe=recipe)


def photo_resolution(ready_info: dict | None) -> int:
    """The side photos are prepared at: the model's own (1024 for SDXL), never below 512 (a tiny test model's is 64,
    and before the worker is ready nothing is known)."""
    return max(intake.IntakeLimits.resolution, int((ready_info or {}).get("native_side") or 0))


async def _take_in_and_queue(services: Services, work_dir: Path, *, guild_id, member_id, channel_id, role_ids,
                             token, class_name, style, files, limits, recipe):
    report = await take_in_photos(list(files), work_dir, limits=limits, class_name=class_name, style=style)
    if not report.ok:
        raise UserError(report.summary())

    model = await training_model(services, guild_id)
    concept = await services.concepts.create(guild_id, member_id, token, class_name, style, base_model=model.name,
                                             base_family=model.family.name if model.family else None)
    try:
        photos_dir = services.concepts.concept_dir(concept.id) / "photos"
        await asyncio.to_thread(report.save, photos_dir)
        params = {**recipe, "concept_id": concept.id, "token": concept.token, "class_name": class_name,
                  "style": bool(style), "seed": secrets.randbelow(2**31), "model": model.name}
        job = await services.ledger.submit("train", member_id, guild_id, channel_id, params, role_ids=role_ids)
        await services.concepts.attach_job(concept.id, job.id, photo_count=len(report.accepted))
    except BaseException:
        await services.concepts.delete(concept.id, member_id)
        raise
    await services.job_submitted(job)
    return job, report


def _mentions(prompt: str, token: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", prompt, re.IGNORECASE) is not None


def check_against_model(ready_info: dict | None, *, width: int | None, height: int | None, safety: bool,
                        size: str | None = None) -> tuple[int | None, int | None]:
    """What depends on the loaded model, checked with what the worker reported when it became ready (its `ready`
    event: the model's family, native side and whether it has a safety checker), by the rule the worker applies.
    A picture shape (`size`, trainer/contract/aspects.py) becomes the family's (width, height), which is returned.
    Until a worker has been ready once this is unknown, and the worker does the same when the job runs."""
    info = ready_info or {}
    family = family_named(info["family"]) if info.get("family") else SD1  # a worker from before families: SD 1.x
    if ready_info is not None and size is not None and not (width or height):
        width, height = size_for(family, size)
    if info.get("native_side") and (width or height):
        check_size(width, height, int(info["native_side"]), family)
    if safety and info.get("safety_checker") is False:
        raise UserError(NO_SAFETY_CHECKER)
    return width, height


async def submit_imagine(services: Services, *, guild_id: int, member_id: int, channel_id: int | None,
                         role_ids: Iterable[int], prompt: str, negative: str = "", seed: int | None = None,
                         steps: int | None = None, cfg: float | None = None, width: int | None = None,
                         height: int | None = None, count: int = 1, upload_limit: int | None = None,
                         init_image: str | None = None, strength: float | None = None, size: str | None = None) -> Job:
    """Check the prompt against the concepts this member may use (now, not when it runs) and the options against the
    loaded model, then queue it with this server's safety filter choice in its params.

    `size` is a picture shape name ("portrait", …): it becomes the loaded model family's width and height here, or,
    before any worker was ready, travels in the params for the worker to resolve the same way.

    Another member's private concept is none of these: its token is plain text in this prompt, and a <lora:> tag
    naming it reads like a typo, so nothing tells the member it exists.
    """
    role_ids = list(role_ids)
    # One read transaction on the read-only connection for every check: no turn of the writer's queue, which the
    # submission itself needs (ledger.submit).
    async with services.store.read():
        await services.ledger.check_submit("imagine", member_id, guild_id, role_ids=role_ids)
        visible = await services.concepts.visible(guild_id, member_id)  # usable ones and own ones, one query
        safety = await services.admin.safety_for(guild_id)
    usable = [c for c in visible if c.status == "ready"]
    for concept in visible:
        if concept.owner_id == member_id and concept.status != "ready" and _mentions(prompt, concept.token):
            raise UserError(f"{concept.token} is still training; you'll be pinged when it's ready." if
                            concept.status == "training" else
                            f"The training of {concept.token} failed, so it can't be used yet. "
                            f"Run /train with the token {concept.token} again to retry.")
    params = {"prompt": prompt, "negative": negative or "", "seed": seed, "steps": steps, "cfg": cfg,
              "width": width, "height": height, "count": count, "upload_limit": upload_limit, "safety": safety}
    if init_image is not None:
        params.update(init_image=str(init_image), strength=strength if strength is not None else VARIATION_STRENGTH)
    params = {k: v for k, v in params.items() if v is not None}
    # The same checks the worker will run (options, tokens, <lora:> tags); the paths are filled in at run time.
    request = ImagineRequest.from_params({
        **params, "out_dir": str(Path(services.settings.data_dir) / "images" / "check"),
        "concepts": [{"concept_id": c.id, "token": c.token, "class_name": c.class_name} for c in usable]})
    used_ids = {use.concept.concept_id for use in request.parsed.uses}
    used = [c for c in usable if c.id in used_ids]
    model = await services.base_models.for_prompt(guild_id, used)  # the concepts' model, else the server's
    if model.problem:
        raise UserError(f"The base model {model.name} can't be used right now: {model.problem[:600]}. "
                        "An admin can see the models with `/queue admin models`.")
    ready = services.worker.ready_info
    if ready is not None and ready.get("model") != model.ref:  # not the model `ready` describes: its own facts
        ready = dict(ready)
        if model.native_side is not None:
            ready["native_side"] = model.native_side
        if model.family is not None:
            ready["family"] = model.family.name
    width, height = check_against_model(ready, width=width, height=height, safety=safety, size=size)
    params.update({k: v for k, v in (("width", width), ("height", height)) if v is not None})
    if ready is None and size is not None and not (width or height):
        params["size"] = size  # no worker was ready yet: the worker turns the shape into its family's size
    params["model"] = model.name
    if used:
        params["model_for"] = [c.token for c in used]  # the reply says which concepts chose the model
    job = await services.ledger.submit("imagine", member_id, guild_id, channel_id, params, role_ids=role_ids)
    await services.job_submitted(job)
    return job
