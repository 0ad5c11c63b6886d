"""Errors the engines raise on purpose; anything else is a bug and is reported with a traceback."""


class UserError(ValueError):
    """A mistake the member can fix (bad photo set, unknown token, option out of range). str() is shown to them."""


class Cancelled(Exception):
    """The job was cancelled; raised at a step boundary."""
