"""Structured logs: one event per line, a short lowercase event name and key=value context.

log_event(logger, logging.INFO, "connected", connection="id-0", contracts=12)
→ ts=2026-11-22T04:00:00.123Z level=info logger=bridge.source event=connected connection=id-0 contracts=12
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

_FIELDS = "event_fields"


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: Any) -> None:
    """Log `event` with structured `fields`; callers never put secrets in fields."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


def log_exception(logger: logging.Logger, event: str, /, **fields: Any) -> None:
    """Log `event` at ERROR with the exception being handled, its traceback kept on the same line (escaped)."""
    logger.error(event, exc_info=True, extra={_FIELDS: fields})


class _Window:
    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 1
        self.suppressed = 0


class RateLimitedLog:
    """Lets an event through in full at most `burst` times per key per `window` seconds, and counts the rest.

    Why: an event logged once per input (a rejected frame) makes a flood of bad input cost a formatted,
    written line each, several times the work of a good input. Call `allow(key)` before building the
    line; a suppressed call costs a clock read and a dict lookup. Windows start at a key's first event
    after the previous one ended. When the next event of a key arrives after a window in which lines
    were suppressed, one `<event>_summary` line (`key_field`, `suppressed`, `window_seconds`) is logged
    first, so no timer task is needed (suppressions still pending at exit are not logged; count them
    with a metric). The state is one entry per key: keys must come from a closed set, such as an enum.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        event: str,
        *,
        key_field: str,
        burst: int = 5,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.summary_event = f"{event}_summary"
        self.key_field = key_field
        self.burst = burst
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def allow(self, key: str) -> bool:
        """Whether this event of `key` is to be logged in full (logging the summary of an ended window first)."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window:
            if window is not None and window.suppressed:
                fields = {self.key_field: key, "suppressed": window.suppressed, "window_seconds": self.window}
                log_event(self.logger, self.level, self.summary_event, **fields)
            self._windows[key] = _Window(now)
            return True
        if window.logged < self.burst:
            window.logged += 1
            return True
        window.suppressed += 1
        return False


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(character in text for character in ' ="\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    fields.update(getattr(record, _FIELDS, {}))
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = repr(record.exc_info[1])
        fields["traceback"] = "".join(traceback.format_exception(record.exc_info[1])).rstrip()
    return fields


class LogfmtFormatter(logging.Formatter):
    """Renders `ts level logger event k=v…`, with any exception appended as `error=`."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """Renders one JSON object per line with the same keys as the logfmt form."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: Literal["logfmt", "json"] = "logfmt") -> None:
    """Send every log line to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs handshake headers, Authorization included, at DEBUG: keep it above that.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
