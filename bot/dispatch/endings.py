"""Recording how a job's run ended: the worker's end event (or one the bot made up) into the ledger."""
from __future__ import annotations

import logging

from bot import metrics
from bot.jobs.kinds import KindContext, kind_of
from bot.jobs.ledger import Job, Ledger

log = logging.getLogger("boothbot.dispatcher")

RECORDING_FAILED = "Your job finished, but the bot could not save its result. Please try again."


def failed(job_id: int, error: str) -> dict:
    """A `failed` end event made by the bot (the job never reached the worker)."""
    return {"event": "failed", "job_id": job_id, "error": error, "detail": ""}


async def record_end(ledger: Ledger, context: KindContext, job: Job, end: dict, seconds: float) -> None:
    """Record a `done`, `cancelled` or `failed` end with this run's GPU seconds; a `done` result is first kept by the
    job's kind (bot/jobs/kinds.py), and the job fails if that breaks."""
    metrics.job_ended(job, end, seconds)
    event = end["event"]
    if event == "done":
        try:
            await kind_of(job.kind).keep_result(job, end["result"], context)
        except Exception:
            log.exception("job %s finished but its result could not be recorded", job.id)
            await ledger.fail(job.id, RECORDING_FAILED, seconds)
            return
        recorded = await ledger.succeed(job.id, end["result"], seconds)
    elif event == "cancelled":
        recorded = await ledger.confirm_cancelled(job.id, seconds)
    else:
        if end.get("detail"):
            log.error("job %s (%s) failed: %s\n%s", job.id, job.kind, end["error"], end["detail"])
        else:
            log.info("job %s (%s) failed: %s", job.id, job.kind, end["error"])
        recorded = await ledger.fail(job.id, end["error"], seconds)
    if not recorded:
        log.warning("job %s was no longer running when it ended (%s); its record was left as it was", job.id, event)
