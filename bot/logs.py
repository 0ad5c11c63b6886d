"""Logging for the bot process: one stream to stderr, secrets (the Discord token) never written out."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REDACTED = "[hidden]"
# Libraries that are too chatty at DEBUG for an operator's log (aiosqlite logs every statement).
QUIET_AT_DEBUG = ("aiosqlite", "asyncio", "PIL", "urllib3", "filelock")


class PlainReconnects(logging.Filter):
    """discord.py logs every reconnect attempt with logger.exception, a full traceback each time the network or
    Discord is down. Below DEBUG that becomes one warning line; at DEBUG the record stays as it was."""

    MESSAGE = "Attempting a reconnect in %.2fs"  # discord/client.py, Client.connect

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.MESSAGE and record.exc_info and not logging.getLogger().isEnabledFor(logging.DEBUG):
            error = record.exc_info[1]
            record.msg = "no connection to Discord (%s); trying again in %.1f s"
            record.args = (f"{type(error).__name__}: {error}", *record.args)
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info = record.exc_text = None
        return True


PLAIN_RECONNECTS = PlainReconnects()


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then replaces every secret in the finished text (message, arguments and tracebacks)."""

    def __init__(self, fmt: str = FORMAT, *, secrets: Iterable[str] = ()):
        super().__init__(fmt)
        # Longest first so a secret that contains another is hidden whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def setup_logging(level: str = "INFO", *, secrets: Iterable[str | None] = (), stream=None) -> logging.Handler:
    """Send every logger to `stream` (stderr) at `level`, hiding `secrets`. Safe to call again (replaces ours)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(secrets=[s for s in secrets if s]))
    handler._boothbot = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_boothbot", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_AT_DEBUG:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    logging.getLogger("discord.client").addFilter(PLAIN_RECONNECTS)  # adding it again is a no-op
    logging.captureWarnings(True)
    return handler
