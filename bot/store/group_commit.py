"""Group commit: writes of one kind that arrive together share one write transaction and one hand-off to a thread.

Under a burst (hundreds of /imagine at once) each submission used to be its own `BEGIN IMMEDIATE … COMMIT`, every
statement a hand-off to the database thread and a turn of the writer's queue, taking turns with claims, progress
and deliveries. Here a caller's request joins a group: one task writes the group in one transaction, in the order
the requests came, each in its own savepoint, so each caller gets its own outcome: the value `write_one` returned,
or the exception it raised (rolled back to its savepoint: the others in the group are not touched). A request sees
everything written before it, its own group's earlier requests included (e.g. a member's job count for a limit).

A caller cancelled before its group is written is left out; one cancelled after that keeps what was written.
"""
from __future__ import annotations

import asyncio
import contextvars
import sqlite3
from collections.abc import Callable
from typing import Generic, TypeVar

from bot.store.database import Store

R = TypeVar("R")
T = TypeVar("T")
# Bounds how long one group holds the write lock (a claim or a progress update waits for the group to end).
MAX_GROUP = 64
_SAVEPOINT = "group_commit_member"


class GroupCommit(Generic[R, T]):
    """`await group.submit(request)` → `write_one(connection, request)`'s value, written with the requests that are
    waiting at the same time. `write_one` runs in a worker thread on the plain sqlite3 connection (Store.run)."""

    def __init__(self, store: Store, write_one: Callable[[sqlite3.Connection, R], T], *, max_group: int = MAX_GROUP):
        self.store = store
        self.write_one = write_one
        self.max_group = max_group
        self._waiting: list[tuple[R, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self.groups_written = 0  # tests and benchmarks look

    async def submit(self, request: R) -> T:
        if self.store.in_transaction_here():
            # The caller holds the write lock, so a group could only start after its transaction ends: write this
            # request alone, inside that transaction (and its savepoint), now.
            [(ok, value)] = await self.store.run(lambda conn: self._write(conn, [request], own_transaction=False))
            if ok:
                return value
            raise value
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._writer is None or self._writer.done():
            # A fresh context: the writer must not inherit the first caller's transaction or read (contextvars).
            self._writer = asyncio.create_task(self._write_groups(), name="group-commit",
                                               context=contextvars.Context())
        return await future

    async def _write_groups(self) -> None:
        while self._waiting:
            # The group is what waits once the writer's turn came: requests that arrive while another writer (a
            # claim, a progress update, the previous group) holds the connection join the next group.
            async with self.store.exclusive():
                taken, self._waiting = self._waiting[:self.max_group], self._waiting[self.max_group:]
                group = [(request, future) for request, future in taken if not future.done()]
                if not group:
                    continue
                requests = [request for request, _ in group]
                try:
                    outcomes = await self.store.run(lambda conn: self._write(conn, requests, own_transaction=True))
                except Exception as error:  # noqa: BLE001 - the transaction failed as a whole: each caller hears why
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
            self.groups_written += 1
            for (_, future), (ok, value) in zip(group, outcomes):
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

    def _write(self, conn: sqlite3.Connection, requests: list[R], *,
               own_transaction: bool) -> list[tuple[bool, object]]:
        """In the worker thread: each request in its own savepoint, the whole group in one transaction."""
        outcomes: list[tuple[bool, object]] = []
        if own_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            for request in requests:
                conn.execute(f"SAVEPOINT {_SAVEPOINT}")
                try:
                    outcomes.append((True, self.write_one(conn, request)))
                except Exception as error:  # noqa: BLE001 - this request's outcome; the others go on
                    conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
                    outcomes.append((False, error))
                conn.execute(f"RELEASE {_SAVEPOINT}")
            if own_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if own_transaction and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes
