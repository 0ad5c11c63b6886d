"""Job kinds on the bot's side: one registry entry per kind holds everything the bot does differently for it.

The dispatcher, the ledger and the scheduler look a job's kind up here (`kind_of`) and never branch on its name.
The names are trainer.contract.protocol.JobKind, shared with the worker, whose HANDLERS table (trainer/worker.py)
runs each kind. Adding a kind: its name in JobKind, a `register(KindSpec(...))` below, a handler in the worker, and
a test.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.contract import batching
from trainer.contract.errors import UserError
from trainer.contract.imagine_request import DEFAULT_CFG, DEFAULT_COUNT, DEFAULT_STEPS, SCHEDULERS
from trainer.contract.protocol import JobKind

if TYPE_CHECKING:
    from bot.jobs.ledger import Job
    from bot.settings import Settings

CONCEPT_GONE = "The concept for this training was deleted before it ran."
IMAGINE_INTERRUPTED = "The bot restarted while this was running; please run /imagine again."
TRAIN_INTERRUPTED = ("The bot restarted during this training {n} times, so it was stopped; "
                     "please try /train again later, or ask an admin if it keeps happening.")
MODEL_GONE = ("This job needs the base model {name}, which this bot no longer offers (an admin changed the bot's "
              "settings). Nothing is lost; it works again once the model is back.")
UNMEASURED_DURATION_S = 60.0  # a kind's guess until jobs of it have been measured, unless its spec says better


@dataclass
class KindContext:
    """What the kinds' hooks may use: the settings (read at each use, so a change applies to the next job) and the
    services a result is kept in."""
    settings: Settings
    concepts: Any  # bot.services.concepts.ConceptService
    gallery: Any   # bot.services.gallery.Gallery


def _runs_alone(params: dict) -> tuple | None:
    return None


def _one(params: dict) -> int:
    return 1


@dataclass(frozen=True)
class KindSpec:
    name: str
    # The job's stored params plus what the bot decides at run time (paths, usable concepts). UserError: the job
    # fails with that message, without the GPU.
    worker_params: Callable[[Job, KindContext], Awaitable[dict]]
    # What a `done` result leaves behind besides the job's record (a concept made ready, images in the gallery).
    keep_result: Callable[[Job, dict, KindContext], Awaitable[None]]
    timeout_s: Callable[[Settings], float]  # for the whole job: the GPU time of its earlier slices counts too
    interrupted: Callable[[Job], str]  # its error when a bot restart ends it
    resumable: bool = False  # a bot restart queues it again (it goes on from its checkpoint)
    runs_between_slices: bool = False  # may use the GPU while a sliced job waits for its next slice
    default_duration_s: float = UNMEASURED_DURATION_S  # its ETA until jobs of this kind have been measured
    # Queued jobs with equal keys may run as one `run_many` (None: this job runs alone), up to `batch_limit` of
    # `batch_share` in all; the batch's GPU time is split by share.
    batch_key: Callable[[dict], tuple | None] = _runs_alone
    batch_share: Callable[[dict], int] = _one
    batch_limit: int = 1


KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    KINDS[spec.name] = spec
    return spec


def kind_of(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}; expected one of {all_kinds()}") from None


def all_kinds() -> tuple[str, ...]:
    return tuple(KINDS)


def between_slices() -> tuple[str, ...]:
    return tuple(name for name, spec in KINDS.items() if spec.runs_between_slices)


def with_model(params: dict, settings: Settings) -> dict:
    """The job's base model as the worker wants it: named when it is not the worker's default (a worker started with
    --model alone knows no names); UserError when the bot no longer offers it."""
    name = params.get("model")
    if name is None:
        return params
    if name not in settings.base_models:
        raise UserError(MODEL_GONE.format(name=name))
    if name == settings.default_model_name:
        return {key: value for key, value in params.items() if key != "model"}
    return params


def preview_path(job: Job, context: KindContext) -> str:
    return str(Path(context.settings.data_dir).resolve() / "previews" / f"{job.id}.webp")


# --- train: a DreamBooth LoRA of a member's concept, in slices ------------------------------------------------------

async def train_params(job: Job, context: KindContext) -> dict:
    concept = await context.concepts.get(job.params["concept_id"])
    if concept is None or concept.status == "deleted":
        raise UserError(CONCEPT_GONE)
    concept_dir = Path(context.concepts.concept_dir(concept.id)).resolve()
    data_dir = Path(context.settings.data_dir).resolve()
    return {**with_model(job.params, context.settings), "concept_id": concept.id, "token": concept.token,
            "class_name": concept.class_name, "style": bool(concept.style),
            "photos_dir": str(concept_dir / "photos"), "out_dir": str(concept_dir),
            "cache_dir": str(data_dir / "cache"), "slice_s": context.settings.train_slice_s,
            "checkpoint_s": context.settings.train_checkpoint_s,
            "seed": job.params.get("seed", job.id), "preview_path": preview_path(job, context)}


async def keep_trained(job: Job, result: dict, context: KindContext) -> None:
    await context.concepts.mark_ready(job.params["concept_id"], result["lora"], result.get("lora_kohya"),
                                      base_family=result.get("family"))


register(KindSpec(
    JobKind.TRAIN, worker_params=train_params, keep_result=keep_trained,
    timeout_s=lambda settings: settings.train_timeout_s,
    interrupted=lambda job: TRAIN_INTERRUPTED.format(n=job.attempts + 1),
    resumable=True, default_duration_s=900.0))  # a LoRA training on a consumer GPU


# --- imagine: images from a prompt, batched with others that can share the denoising loop ---------------------------

async def imagine_params(job: Job, context: KindContext) -> dict:
    usable = await context.concepts.usable(job.guild_id, job.owner_id)  # others' private concepts: plain text
    model = job.params.get("model") or context.settings.default_model_name
    # Only LoRAs of the job's base model fit its pipeline; a concept of another model is plain text here.
    concepts = [{"concept_id": c.id, "token": c.token, "class_name": c.class_name,
                 "lora_path": c.lora_path, "weight": 1.0} for c in usable
                if c.lora_path and (c.base_model or context.settings.default_model_name) == model]
    out_dir = Path(context.settings.data_dir).resolve() / "images" / str(job.id)
    return {"safety": context.settings.safety, **with_model(job.params, context.settings), "concepts": concepts,
            "out_dir": str(out_dir),
            "job_id": job.id, "preview_path": preview_path(job, context)}


async def keep_images(job: Job, result: dict, context: KindContext) -> None:
    await context.gallery.add(job.id, job.owner_id, job.guild_id, list(result.get("images", [])),
                              list(result.get("seeds", [])), job.params.get("prompt", ""))


def imagine_batch_key(params: dict) -> tuple | None:
    """The shared batching rule (trainer/contract/batching.py) on stored params: a missing option means the engine's
    default; a missing width or height means the model's own size, so it only matches another missing one. None (runs
    alone) also for options the worker will reject anyway."""
    try:
        options = {"width": _side(params.get("width")), "height": _side(params.get("height")),
                   "steps": int(params.get("steps") or DEFAULT_STEPS), "cfg": float(params.get("cfg") or DEFAULT_CFG),
                   "scheduler": str(params.get("scheduler") or SCHEDULERS[0]).strip().lower()}
    except (TypeError, ValueError):
        return None
    key = batching.batch_key(options, variation=bool(params.get("init_image")))
    return None if key is None else (params.get("model"), *key)  # one denoising loop runs on one base model


def image_count(params: dict) -> int:
    try:
        return max(1, int(params.get("count") or DEFAULT_COUNT))
    except (TypeError, ValueError):
        return DEFAULT_COUNT


def _side(value) -> int | None:
    return None if value in (None, "") else int(value)


register(KindSpec(
    JobKind.IMAGINE, worker_params=imagine_params, keep_result=keep_images,
    timeout_s=lambda settings: settings.imagine_timeout_s, interrupted=lambda job: IMAGINE_INTERRUPTED,
    runs_between_slices=True, default_duration_s=20.0,  # one /imagine batch
    batch_key=imagine_batch_key, batch_share=image_count, batch_limit=batching.MAX_BATCH_IMAGES))
