"""Structured logs: one JSON object per line, with the fields a call passes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


async def test_supernode_logs_one_structured_line_per_fetched_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the registry's token and a redirect to signed storage URLs, the line names the
    registry host and never the token nor the storage URL."""
    from tests.supernode.helpers import BLOB, DIGEST, SIZE, FakeRegistry, make_blob, running

    missing, _ = make_blob(1000, seed=99)
    token = "Bearer s3cr3t-token"
    registry = FakeRegistry(blobs={str(DIGEST): BLOB}, token=token, redirect=True)
    caplog.set_level(logging.INFO)
    async with running(tmp_path, registry) as h:
        await h.register("p1", authorization=token)
        await h.wait_done()
        await h.register("p2", digest=missing, size=1000, authorization=token)
        await h.wait_done(missing)
    lines = [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "fetch"
    ]
    assert len(lines) == 2
    ok, failed = lines
    assert ok["digest"] == str(DIGEST) and ok["state"] == "ready" and ok["bytes"] == SIZE
    assert ok["upstream"] == "registry.test" and ok["repository"] == "team/app"
    assert ok["source"] == "upstream" and 0 <= ok["seconds"] < 20 and ok["error"] is None
    assert failed["digest"] == str(missing) and failed["state"] == "failed"
    assert "404" in failed["error"]
    for line in lines:
        text = json.dumps(line)
        assert "s3cr3t" not in text and "storage.test" not in text
