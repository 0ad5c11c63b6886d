"""Which jobs a channel message (or the body of a POST the bot sent) announces as finished.

The member-visible outcome of a job is one of: a result with the job's buttons (/imagine: `bb:reroll:<id>`), a
"`token` is ready" post (/train: the token names the training), or a text naming the job as cancelled, interrupted
or failed (a cancelled job's status message is edited into that text). Status messages ("job 7 is 2nd in the
queue", progress) are not outcomes.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from bench.wire.fake_discord import message_text

ENDED = re.compile(r"\bjob (\d+) (?:was cancelled|was interrupted|failed:)")
READY = re.compile(r"`([^`]+)` is ready")
RESULT_BUTTON = re.compile(r"^bb:reroll:(\d+)$")
CHANNEL_POST = re.compile(r"^/channels/\d+/messages$")


def announced_jobs(message: dict, job_of_token: Mapping[str, int]) -> set[int]:
    """The ids of the jobs whose outcome this message carries (a training's by its token, via `job_of_token`).
    A result is known by its buttons or its token, never by its text, which holds the member's prompt."""
    buttons = {int(match.group(1)) for row in message.get("components") or []
               for component in row.get("components") or []
               if (match := RESULT_BUTTON.match(component.get("custom_id") or ""))}
    if buttons:
        return buttons
    if ready := READY.findall(message.get("content") or ""):
        return {job_of_token[token] for token in ready if token in job_of_token}
    return {int(job_id) for job_id in ENDED.findall(message_text(message))}


def is_result(message: dict) -> bool:
    """A job's successful result (images with their buttons, or a trained concept's samples): work the worker did."""
    buttons = (c.get("custom_id") or "" for row in message.get("components") or [] for c in row.get("components") or [])
    return any(RESULT_BUTTON.match(b) for b in buttons) or bool(READY.search(message.get("content") or ""))


def is_outcome_post(method: str, path: str, body: dict | None) -> bool:
    """A channel-message POST that announces some job's end (for timing a kill while it is in flight)."""
    if method != "POST" or not CHANNEL_POST.match(path) or not body:
        return False
    return bool(announced_jobs(body, {}) or READY.search(body.get("content") or ""))
