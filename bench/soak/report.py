"""The soak's summary: a table for people, or one JSON object (--json)."""
from __future__ import annotations

import collections
import dataclasses

from bench.soak.run import SoakResult

STATUSES = ("succeeded", "failed", "cancelled", "interrupted", "queued", "running")


def summary(result: SoakResult) -> dict:
    kills = collections.Counter(kill.target for kill in result.kills)
    by_kind = collections.defaultdict(collections.Counter)
    for job in result.jobs.values():
        by_kind[job.kind][job.status] += 1
    deliveries = collections.Counter(min(result.outcomes.get(job_id, 0), 2) for job_id in result.jobs)
    told = result.told
    return {
        "seed": result.options.seed,
        "seconds": round(result.seconds, 1),
        "kills": {"bot": kills["bot"], "worker": kills["worker"],
                  "bot_during_outcome_post": sum(k.during_outcome_post for k in result.kills)},
        "bot_starts": result.bot_starts,
        "outcome_posts_dropped_by_kills": result.abandoned_posts,
        "commands": dict(told.commands) if told else {},
        "unanswered_commands": told.unanswered if told else 0,
        "jobs": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "outcome_messages_per_job": {"0": deliveries[0], "1": deliveries[1], "2+": deliveries[2]},
        "integrity_checks": {"ok": result.integrity_checks.count("ok"), "total": len(result.integrity_checks)},
        "violations": [dataclasses.asdict(v) for v in result.violations],
    }


def table(result: SoakResult) -> str:
    data = summary(result)
    kills = data["kills"]
    lines = [f"soak: {kills['bot'] + kills['worker']} kills in {data['seconds']:.0f} s (seed {data['seed']})",
             f"  kill -9 bot     {kills['bot']:>4}   ({kills['bot_during_outcome_post']} while an outcome post was "
             f"in flight; {data['outcome_posts_dropped_by_kills']} posts dropped with the bot)",
             f"  kill -9 worker  {kills['worker']:>4}",
             f"  commands        {', '.join(f'{k} {v}' for k, v in sorted(data['commands'].items()))}"
             f" ({data['unanswered_commands']} unanswered: the bot died first)",
             "", f"  {'jobs':<10}" + "".join(f"{s:>12}" for s in STATUSES) + f"{'total':>8}"]
    for kind, counts in data["jobs"].items():
        lines.append(f"  {kind:<10}" + "".join(f"{counts.get(s, 0):>12}" for s in STATUSES)
                     + f"{sum(counts.values()):>8}")
    per_job = data["outcome_messages_per_job"]
    checks = data["integrity_checks"]
    lines += ["", f"  outcome messages per job: 0 -> {per_job['0']} jobs, 1 -> {per_job['1']}, "
                  f"2 or more -> {per_job['2+']}",
              f"  PRAGMA integrity_check: ok {checks['ok']} of {checks['total']}",
              "", f"violations: {len(result.violations)}"]
    for violation in result.violations:
        job = f"job {violation.job_id}" if violation.job_id is not None else "-"
        lines.append(f"  {violation.rule:<16} {job:<9} {violation.what} ({violation.at})")
    return "\n".join(lines)
