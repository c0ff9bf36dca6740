"""Structured logging: one JSON object per line in containers, readable text on a terminal."""
from __future__ import annotations

import json
import logging
import sys
import time

from margin.common.config import LOG_FORMAT, LOG_LEVEL

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, stream=None) -> None:
    """Log to ``stream`` (default stderr). Celery pool processes pass ``sys.__stderr__``: their ``sys.stderr`` is
    Celery's logging proxy, which drops records that come back through logging."""
    stream = stream or sys.stderr
    fmt = LOG_FORMAT.get()
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else
                         logging.Formatter(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVEL.get().upper())
