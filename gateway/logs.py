"""The gateway's log: text lines for a person, or JSON lines for a log pipeline (`--log-format json`);
and lines that would come with every request written at most once per key every few seconds."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import IO, Any

import orjson

FORMATS = ("text", "json")
LEVELS = ("critical", "error", "warning", "info", "debug")
TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# uvicorn's loggers: they write through the same handler, in the same format, as the gateway's.
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")
LOG_EVERY_S = 10.0  # a line that would come with every request: at most this often (per key)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message; the exception's traceback,
    when there is one, as one string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """The process's log: every logger (uvicorn's too) through one handler on stderr (or stream)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.propagate = True


class Every:
    """At most one line per key every `seconds`, saying how many were left out since the last one."""

    def __init__(self, seconds: float, clock: Any = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._logged: dict[object, tuple[float, int]] = {}  # key -> (last logged, left out since)

    def due(self, key: object) -> str | None:
        """None: leave this one out; else the suffix to log it with ("" or " (N more since ...)")."""
        now = self._clock()
        last, quiet = self._logged.get(key, (-self.seconds - 1.0, 0))
        if now - last < self.seconds:
            self._logged[key] = (last, quiet + 1)
            return None
        if len(self._logged) > 10_000:  # keys are routes and reasons: bounded, but never trusted to be
            self._logged.clear()
        self._logged[key] = (now, 0)
        return f" ({quiet} more since the last such line)" if quiet else ""
