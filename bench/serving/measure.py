"""The serving figures, measured on one bot from a fresh data directory, in an order that keeps each one honest:
the first /imagine right after the worker reports ready; the cold /train (nothing cached yet) with another member's
/imagine sent a few seconds into it and then every few seconds while it runs; /imagine alone; /imagine with the new
concept; a second /train of the same class (class images cached), again with /imagine during it; then bursts of
members' /imagine at once."""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.serving.breakdown import WallClock, imagine_breakdown, train_breakdown
from bench.serving.served_bot import ServedBot, Timed

CLASS_NAME = "man"
TOKENS = ("zqxv", "vkzq")  # made-up words, as /train asks for
PHOTOS = 5


@dataclass
class Plan:
    imagine_options: dict  # what each /imagine sends besides its prompt (--tiny: few steps)
    repeats: int  # /imagine alone and with the concept
    during_after_s: float  # when the other member's first /imagine goes out, after the /train was sent
    during_every_s: float  # and the next ones, each after the one before was sent (or came back, if later)
    burst_members: int
    burst_rounds: int
    photo_side: int
    settle_s: float = 0.0  # at most this long, before /imagine alone, for the forwards compiled ahead of time


def seconds(values: list[float]) -> dict:
    """count, p50, p99 and max of latencies in seconds (p99: the nearest-rank value, so it is a real sample)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]
    return {"count": len(values), "p50_s": round(statistics.median(values), 3), "p99_s": round(p99, 3),
            "max_s": round(ordered[-1], 3)}


def photo_bytes(count: int, side: int, seed: int) -> list[bytes]:
    """A member's photos as uploaded: PNG files, distinct enough that intake keeps every one."""
    from bench.fixtures import write_photos

    with tempfile.TemporaryDirectory() as tmp:
        return [path.read_bytes() for path in write_photos(Path(tmp), count, side, seed=seed)]


async def measure(bot: ServedBot, plan: Plan, out: dict) -> None:
    """Every figure into `out`, each as soon as it is measured."""
    member, clock = bot.fake.member, WallClock()
    await bot.wait_ready()
    out["start_to_ready_s"] = round(bot.ready_at - bot.started_at, 2)
    first = await bot.imagine(member("first"), "a photo of a lighthouse", **plan.imagine_options)
    out["imagine_first_after_ready_s"] = round(first.ended - bot.ready_at, 3)

    owner, visitor = member("owner"), member("visitor")
    cold, during_cold = await train_while_others_imagine(bot, owner, TOKENS[0], photo_bytes(PHOTOS, plan.photo_side, 1),
                                                         visitor, plan)
    out["train_cold_s"] = round(cold.seconds, 2)
    out["train_cold_parts"] = train_breakdown(bot.db_path, 0, cold.sent, cold.ended, clock)
    out["imagine_during_training"] = during_figures(during_cold, [])
    if plan.settle_s:
        out["compiled_ahead"] = await bot.settle_compiled(plan.settle_s)

    alone = [await bot.imagine(visitor, f"a photo of a dog number {i}", **plan.imagine_options)
             for i in range(plan.repeats)]
    out["imagine_alone"] = seconds([t.seconds for t in alone])
    out["imagine_alone_parts"] = imagine_breakdown(bot.db_path, [(t.job_id, t.sent, t.ended) for t in alone],
                                                   clock)
    with_concept = [await bot.imagine(owner, f"a photo of {TOKENS[0]} {CLASS_NAME} number {i}",
                                      **plan.imagine_options) for i in range(plan.repeats + 1)]
    out["imagine_with_concept"] = {"first_s": round(with_concept[0].seconds, 3),
                                   **seconds([t.seconds for t in with_concept[1:]])}

    # Other photos of the same class: only the class images are shared with the first training.
    owner2 = member("owner2")
    warm, during_warm = await train_while_others_imagine(bot, owner2, TOKENS[1],
                                                         photo_bytes(PHOTOS, plan.photo_side, 2), visitor, plan)
    out["train_warm_s"] = round(warm.seconds, 2)
    out["train_warm_parts"] = train_breakdown(bot.db_path, 1, warm.sent, warm.ended, clock)
    out["imagine_during_training"] = during_figures(during_cold, during_warm)

    out["burst"] = await bursts(bot, plan, clock)
    out["burst_concepts"] = await concept_bursts(bot, plan, clock, (owner, owner2))
    out["gpu_peak_gb"] = await bot.gpu_peak_gb()


def during_figures(cold: list[float], warm: list[float]) -> dict:
    """The /imagine jobs sent during both trainings; `first_s`: the first one, sent `during_after_s` into the cold one
    (the issue's "an /imagine sent 8 s into that training"); each one's seconds too, in the order sent."""
    return {"first_s": round(cold[0], 3) if cold else None, **seconds(cold + warm),
            "each_cold_s": [round(s, 3) for s in cold], "each_warm_s": [round(s, 3) for s in warm]}


async def train_while_others_imagine(bot: ServedBot, owner, token: str, photos: list[bytes], visitor,
                                     plan: Plan) -> tuple[Timed, list[float]]:
    """`owner`'s /train to its "ready" post; `plan.during_after_s` after it was sent `visitor` sends an /imagine, then
    another every `plan.during_every_s` (or when the last came back, if later) until the training is done. Returns
    the training and the latencies of the /imagine jobs sent while it ran."""
    training = asyncio.create_task(bot.train(owner, token, CLASS_NAME, photos))
    latencies: list[float] = []
    next_at = time.monotonic() + plan.during_after_s
    while not training.done():
        await asyncio.wait({training}, timeout=max(0.0, next_at - time.monotonic()))
        if training.done():
            break
        timed = await bot.imagine(visitor, f"a watercolour of a harbour number {len(latencies)}",
                                  **plan.imagine_options)
        latencies.append(timed.seconds)
        next_at = timed.sent + plan.during_every_s
    return await training, latencies


async def concept_bursts(bot: ServedBot, plan: Plan, clock: WallClock, owners) -> dict:
    """Bursts as `bursts`, each member's /imagine with one of the two trained concepts (shared first), alternating:
    every batch mixes two LoRAs, so it runs through generation's mixed-LoRA slot. The first round runs the slot's
    forward before it is compiled (`first_round_s`); then, settled (`plan.settle_s`), the timed rounds."""
    for owner, token in zip(owners, TOKENS):
        await bot.share(owner, token)

    def prompt(round_: int, i: int) -> str:
        return f"a photo of {TOKENS[i % 2]} {CLASS_NAME} number {round_}-{i}"

    first = await bursts(bot, plan, clock, prompt=prompt, round_count=1, label="mixed")
    out = {"first_round_s": first["rounds_s"][0]}
    if plan.settle_s:
        out["compiled_ahead"] = await bot.settle_compiled(plan.settle_s)
    return {**out, **await bursts(bot, plan, clock, prompt=prompt, label="mixed")}


async def bursts(bot: ServedBot, plan: Plan, clock: WallClock, *, prompt=None, round_count: int | None = None,
                 label: str = "burst") -> dict:
    """`burst_members` members' /imagine sent at once, to the last result, `burst_rounds` times: images/s; and where
    the time went for the member served last in each round (`last_parts`, medians over the rounds)."""
    members = [bot.fake.member(f"{label}{i}") for i in range(plan.burst_members)]
    prompt = prompt or (lambda round_, i: f"a photo of a cat number {round_}-{i}")
    rounds, lasts = [], []
    for round_ in range(plan.burst_rounds if round_count is None else round_count):
        started = time.monotonic()
        timed = await asyncio.gather(*(bot.imagine(m, prompt(round_, i), **plan.imagine_options)
                                       for i, m in enumerate(members)))
        last = max(timed, key=lambda t: t.ended)
        rounds.append(last.ended - started)
        lasts.append((last.job_id, started, last.ended))  # from the round's start: the parts add up to the round
    images = plan.burst_members * plan.imagine_options.get("count", 1)
    return {"members": plan.burst_members, "rounds_s": [round(r, 3) for r in rounds],
            "images_per_s": [round(images / r, 2) for r in rounds],
            "last_parts": imagine_breakdown(bot.db_path, lasts, clock),
            "images_per_s_overall": round(images * len(rounds) / sum(rounds), 2)}

