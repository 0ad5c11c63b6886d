"""The soak's reading of the channel and its invariants (bench/soak), on the texts and buttons the bot really sends:
if cogs/_render.py or the result buttons change, these fail instead of the soak quietly seeing no outcomes."""
from __future__ import annotations

from bench.soak.database import JobRow
from bench.soak.invariants import DOWN, FINAL, RUNNING, check_jobs
from bench.soak.outcomes import announced_jobs, is_outcome_post, is_result
from bot.jobs.ledger import Job
from cogs import _render
from cogs._views import result_view


def job(job_id: int, kind: str = "imagine", status: str = "succeeded", **params) -> Job:
    return Job(id=job_id, kind=kind, owner_id=5, guild_id=6, channel_id=7, message_id=None, params=params,
               status=status, priority=0, attempts=0, error="boom" if status == "failed" else None, result={},
               progress_step=None, progress_total=None, gpu_seconds=0.0, cancel_requested=False, created_at=0.0,
               started_at=None, finished_at=None, delivered_at=None)


def row(job_id: int, status: str = "succeeded", *, delivered: bool = True, kind: str = "imagine") -> JobRow:
    return JobRow(job_id, kind, status, None, None, delivered, 0)


async def test_each_outcome_the_bot_posts_names_its_job():
    components = result_view(12, 2).to_components()  # a View needs a running event loop
    imagine = {"content": _render.imagine_done_text(job(12, prompt="a job 3 failed dog"), {}),
               "components": components}
    trained = {"content": _render.train_done_text(job(13, "train", token="qzvkt", class_name="dog"), {})}
    assert announced_jobs(imagine, {}) == {12} and is_result(imagine)
    assert announced_jobs(trained, {"qzvkt": 13}) == {13} and is_result(trained)
    for status in ("failed", "cancelled", "interrupted"):
        ended = {"content": _render.failed_text(job(14, status=status))}
        assert announced_jobs(ended, {}) == {14} and not is_result(ended), status
        assert is_outcome_post("POST", "/channels/7/messages", ended)
    status_message = {"embeds": [_render.queued_embed(job(15, status="queued"), 2, 30.0).to_dict()]}
    assert announced_jobs(status_message, {}) == set()
    assert not is_outcome_post("PATCH", "/channels/7/messages/1", imagine)


def test_a_result_marked_delivered_but_missing_is_seen_as_soon_as_the_bot_is_down():
    jobs = {1: row(1), 2: row(2, delivered=False), 3: row(3, "running", delivered=False)}
    seen = check_jobs(jobs, {}, told_imagines=[1, 2, 3], told_tokens=[], at="after kill 1 (bot)", stage=DOWN)
    assert [(v.rule, v.job_id) for v in seen] == [("no outcome", 1)]
    assert check_jobs(jobs, {}, told_imagines=[], told_tokens=[], at="x", stage=RUNNING) == []


def test_at_the_end_every_job_has_ended_with_exactly_one_outcome_and_none_is_lost():
    jobs = {1: row(1), 2: row(2, "failed"), 3: row(3, "queued", delivered=False), 4: row(4, "cancelled")}
    seen = check_jobs(jobs, {1: 1, 2: 2, 4: 0}, told_imagines=[1, 2, 9], told_tokens=["qzvkt"], at="at the end",
                      stage=FINAL)
    assert sorted((v.rule, v.job_id or 0) for v in seen) == [
        ("announced twice", 2), ("lost", 0), ("lost", 9), ("no outcome", 4), ("unfinished", 3)]
