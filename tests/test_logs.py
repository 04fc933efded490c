"""Structured logs: one JSON object per line, with the fields a call passes."""

from __future__ import annotations

import json
import logging

import pytest

from p2pd.config import ConfigError, P2pdConfig
from p2pd.logs import JsonFormatter


def test_json_lines_carry_the_structured_fields() -> None:
    record = logging.LogRecord(
        "p2pd.blobs", logging.INFO, __file__, 1, "download of %s", ("x",), None
    )
    record.fields = {"event": "pull", "digest": "sha256:ab", "bytes": 10, "seconds": 0.5}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "download of x"
    assert line["level"] == "info" and line["logger"] == "p2pd.blobs"
    assert line["event"] == "pull" and line["bytes"] == 10 and line["seconds"] == 0.5
    assert line["ts"].endswith("Z")


def test_log_format_is_validated() -> None:
    assert P2pdConfig.from_mapping({"log_format": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_format"):
        P2pdConfig.from_mapping({"log_format": "xml"})
