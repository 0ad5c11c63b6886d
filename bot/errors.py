"""Errors bot/ services raise for members; str() is the message the cog shows (ephemeral).

SetupError is the operator's: a problem with this machine's setup that stops the bot (see trainer/contract/errors.py).
"""
from trainer.contract.errors import SetupError, UserError


class LimitError(UserError):
    """A per-member limit (queued jobs, trainings per day) is reached."""


class BannedError(UserError):
    """The member is banned from using the bot on this server."""


class PermissionDenied(UserError):
    """The member may not do this (someone else's concept, an admin command)."""


class NotFound(UserError):
    """No such job, concept or image (or the member may not see it)."""


__all__ = ["SetupError", "UserError", "LimitError", "BannedError", "PermissionDenied", "NotFound"]
