"""How errors reach members: mistakes get their own text; bugs get a logged traceback and an apology with a
reference."""
from __future__ import annotations

import logging
import types

from discord import app_commands

from bot.client import answer_error
from bot.errors import LimitError


class RecordingInteraction:
    """Just the surface answer_error touches: extras, ids, the command, and where the answer goes."""

    def __init__(self, *, acknowledged: bool):
        self.id = 1234
        self.extras: dict = {}
        self.user = types.SimpleNamespace(id=99)
        self.command = types.SimpleNamespace(qualified_name="imagine")
        self.data = {}
        self.sent: list[tuple[str, str, bool]] = []
        done = acknowledged
        outer = self

        class Response:
            def is_done(self):
                return done

            async def send_message(self, text, ephemeral=False):
                outer.sent.append(("response", text, ephemeral))

        class Followup:
            async def send(self, text, ephemeral=False):
                outer.sent.append(("followup", text, ephemeral))

        self.response, self.followup = Response(), Followup()


async def test_member_mistakes_are_answered_with_their_own_text_ephemerally():
    interaction = RecordingInteraction(acknowledged=False)
    command = types.SimpleNamespace(name="imagine")
    await answer_error(interaction, app_commands.CommandInvokeError(command, LimitError("wait for one to finish")))
    assert interaction.sent == [("response", "wait for one to finish", True)]


async def test_unexpected_errors_are_logged_with_the_job_id_and_apologised_for(caplog):
    interaction = RecordingInteraction(acknowledged=True)
    interaction.extras["job_id"] = 42
    with caplog.at_level(logging.ERROR, logger="bot.client"):
        await answer_error(interaction, RuntimeError("disk on fire"))
    (where, text, ephemeral), = interaction.sent
    assert where == "followup" and ephemeral and "job 42" in text and "disk on fire" not in text
    record = caplog.records[-1]
    assert "job 42" in record.getMessage() and record.exc_info[0] is RuntimeError


async def test_without_a_job_the_reference_is_the_interaction():
    interaction = RecordingInteraction(acknowledged=False)
    await answer_error(interaction, KeyError("x"))
    assert "ref 1234" in interaction.sent[0][1]
