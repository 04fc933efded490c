"""``supernode status`` against a real in-process supernode: tasks, progress, rates, failures,
and a clear exit 1 when nothing answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from benchmarks.harness.procs import free_port
from p2pd.status import human
from supernode import cli, status
from tests.supernode.helpers import BLOB, DIGEST, PIECE, SIZE, FakeRegistry, make_blob, running

OTHER_SIZE = PIECE - 12_345  # under hold_after: never held
OTHER, OTHER_BLOB = make_blob(OTHER_SIZE, seed=11)
MISSING, _ = make_blob(1000, seed=12)


def table_row(out: str, digest: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.startswith(digest[:19])]
    return line.split()


async def test_status_shows_tasks_progress_rates_and_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # DIGEST's body pauses after its first piece; OTHER (smaller) never reaches that point
    registry = FakeRegistry(blobs={str(DIGEST): BLOB, str(OTHER): OTHER_BLOB}, hold_after=PIECE)
    async with running(tmp_path, registry) as h:
        await h.register("ready-peer", digest=OTHER, size=OTHER_SIZE)
        await h.wait_done(OTHER)
        await h.register("fetching-peer")  # DIGEST: held after its first piece
        await h.register("failing-peer", digest=MISSING, size=1000)
        await h.wait_done(MISSING)
        with trio.fail_after(10):
            await registry.held.wait()
        url = f"http://127.0.0.1:{h.port}"

        # one sample: the held task shows its first piece and no rate yet
        code = await trio.to_thread.run_sync(cli.main, ["status", "--url", url, "--interval", "0"])
        assert code == 0
        out = capsys.readouterr().out
        assert f"supernode {url} (seeder 127.0.0.1:{h.port})" in out
        assert "tasks: 3 (1 failed, 1 fetching, 1 ready); peers: 3" in out
        fetching = table_row(out, str(DIGEST))
        assert fetching[1:3] == ["fetching", f"{100 * PIECE / SIZE:.1f}%"]
        assert fetching[-4:] == ["-", "1", "0", "team/app"]
        ready = table_row(out, str(OTHER))
        assert ready[1:3] == ["ready", "100.0%"] and ready[-3:] == ["1", "0", "team/app"]
        assert table_row(out, str(MISSING))[1] == "failed"
        assert f"{MISSING}: GET https://registry.test" in out and "404" in out
        assert f"held: {human(PIECE + OTHER_SIZE)} of " in out

        # two samples: the registry is let go during the interval, the rate shows it
        async with trio.open_nursery() as nursery:
            argv = ["status", "--url", url, "--interval", "0.5"]
            nursery.start_soon(trio.to_thread.run_sync, cli.main, argv)
            await trio.sleep(0.2)
            registry.release.set()
        out = capsys.readouterr().out
        row = table_row(out, str(DIGEST))
        assert row[1:3] == ["ready", "100.0%"]
        assert re.fullmatch(r"[0-9.]+ (kB|MB|GB)/s", " ".join(row[5:7])), row

        code = await trio.to_thread.run_sync(cli.main, ["status", "--url", url, "--json"])
        assert code == 0
        body = json.loads(capsys.readouterr().out)
        assert {t["digest"] for t in body["tasks"]} == {str(DIGEST), str(OTHER), str(MISSING)}


def test_status_finds_the_address_in_the_environment_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("SUPERNODE_LISTEN", f"0.0.0.0:{port}")
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"supernode status: no supernode answers at http://127.0.0.1:{port}")
    monkeypatch.delenv("SUPERNODE_LISTEN")
    config = tmp_path / "supernode.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\n')
    monkeypatch.setenv("SUPERNODE_CONFIG", str(config))
    assert cli.main(["status"]) == 1
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().err
    assert cli.main(["status", "--listen", "nonsense"]) == 1
    assert "bad listen address" in capsys.readouterr().err


def test_progress_counts_the_tasks_own_pieces() -> None:
    task = {"size": 600_000, "seeded": 2, "piece_size": 65536}
    assert status.seeded_bytes(task) == 2 * 65536
    # a supernode from before /status named the piece size: the rule's (256 KiB here)
    assert status.seeded_bytes({"size": 600_000, "seeded": 2}) == 2 * PIECE
    assert status.seeded_bytes({**task, "seeded": 10}) == 600_000
    assert status.seeded_bytes({**task, "piece_size": "x"}) == 0
