"""Log set-up for both daemons: plain lines for a terminal, or one JSON object per line.

JSON lines carry the timestamp, level, logger and message, plus the structured fields a call
passes in ``extra={"fields": {...}}`` (the per-pull line gives digest, bytes, sources and
duration that way), so a log pipeline can aggregate pulls without parsing prose.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_HANDLER_NAME = "p2p-layers"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: int, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # replace our own handler from an earlier call, keep anyone else's (pytest's capture)
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; redirects to blob storage carry signatures
    logging.getLogger("httpx").setLevel(max(logging.WARNING, level))
