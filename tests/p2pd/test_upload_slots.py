"""The daemon registers one upload slot per 100 Mbit/s of its uplink, at most `upload_slots`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from p2pd.config import P2pdConfig
from p2pd.daemon import Daemon

MBIT = 1e6 / 8


async def _slots(
    tmp_path: Path, nic: float | None, reload_rate: int | None = None, **options: object
) -> tuple[int, int, list[str]]:
    """(slots registered at start, after a SIGHUP reload to `reload_rate`, hosts asked)."""
    asked: list[str] = []

    def nic_speed(host: str) -> float | None:
        asked.append(host)
        return nic

    config = P2pdConfig.from_mapping({"data_dir": str(tmp_path), **options})
    async with trio.open_nursery() as nursery:
        daemon = Daemon(config, nursery, nic_speed=nic_speed)
        try:
            first = daemon.stats()["upload_slots"]
            assert first == daemon.swarm.config.upload_slots
            if reload_rate is not None:
                daemon.reload(
                    P2pdConfig.from_mapping(
                        {**options, "data_dir": str(tmp_path), "upload_rate": reload_rate}
                    )
                )
            return first, daemon.swarm.config.upload_slots, asked
        finally:
            await daemon.aclose()


async def test_a_slow_nic_feeds_one_child(tmp_path: Path) -> None:
    first, _, asked = await _slots(tmp_path, 100 * MBIT, advertise="10.0.0.7:65003")
    assert first == 1
    assert asked == ["10.0.0.7"]  # the interface other hosts reach this one on


async def test_a_fast_or_unknown_nic_keeps_the_configured_slots(tmp_path: Path) -> None:
    assert (await _slots(tmp_path, 10_000 * MBIT))[0] == 8
    assert (await _slots(tmp_path, None))[0] == 8
    assert (await _slots(tmp_path, None, upload_slots=3))[0] == 3
    assert (await _slots(tmp_path, 1000 * MBIT, upload_slots=20))[0] == 10


async def test_upload_rate_is_the_uplink_and_a_reload_applies_to_new_downloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pd.daemon")
    # a limit below the NIC's speed is what the other hosts get
    first, after, _ = await _slots(
        tmp_path, 10_000 * MBIT, reload_rate=int(250 * MBIT), upload_rate=int(400 * MBIT)
    )
    assert (first, after) == (4, 2)
    assert "upload slots per blob: 2 (uplink 250 Mbit/s, upload_slots 8)" in caplog.text
    # lifting the limit falls back to the NIC
    assert (await _slots(tmp_path, 100 * MBIT, reload_rate=0, upload_rate=int(400 * MBIT)))[:2] == (
        4,
        1,
    )
