"""The console commands exist, say what they do, and refuse honestly what they cannot do yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli as bench_cli
from p2pd import cli as p2pd_cli


@pytest.mark.parametrize("module", ["p2pd.cli", "supernode.cli", "benchmarks.cli"])
def test_help_runs(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    )
    assert "usage:" in out.stdout


def test_p2pd_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        p2pd_cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_p2pd_refuses_a_bad_option_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert p2pd_cli.main(["run", "--mirror-listen", "nowhere"]) == 2
    assert "mirror_listen" in capsys.readouterr().err


def test_p2pd_refuses_a_bad_variable_by_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PD_UPLOAD_RATE", "fast")
    assert p2pd_cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "option upload_rate: want an integer, got 'fast' (set by P2PD_UPLOAD_RATE)" in err


def test_p2pd_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert p2pd_cli.main(["layout", str(5 * 1024 * 1024 * 1024)]) == 0
    assert capsys.readouterr().out.split() == [
        "size=5368709120",
        "piece_size=8388608",
        "pieces=640",
        "last=8388608",
    ]
    with pytest.raises(SystemExit):
        p2pd_cli.main(["layout", "-5"])
    assert "out of range" in capsys.readouterr().err


def test_bench_micro_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "micro.json"
    assert bench_cli.main(["micro", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["verify"]["ratio_to_raw"] > 0
    assert report["scheduler"]["decisions_per_s"] > 0
    assert report["manifest"]["pieces"] == 2560


def test_bench_storm_makes_its_output_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run where no bench-out/ exists yet: the report lands there (it once crashed after the
    whole simulation, losing it)."""
    monkeypatch.chdir(tmp_path)
    args = ["storm", "--nodes", "3", "--layers-mib", "1", "--no-progress"]
    assert bench_cli.main(args) == 0
    report = json.loads((tmp_path / "bench-out" / "storm.json").read_text())
    assert len(report["per_node"]["duration"]) == 3
    assert "JSON: bench-out/storm.json" in capsys.readouterr().out


def test_p2pd_status_renders_traffic_rates_and_downloads() -> None:
    from p2pd.status import render

    digest = "sha256:" + "ab" * 32
    before = {
        "peer_id": "h1",
        "bytes_from_peers": 1_000_000,
        "bytes_to_clients": 0,
        "downloads": [{"digest": digest, "size": 20_000_000, "have": 1_000_000, "sources": {}}],
    }
    after = {
        "peer_id": "h1",
        "bytes_from_registry": 0,
        "bytes_from_peers": 5_000_000,
        "bytes_to_peers": 0,
        "bytes_to_clients": 4_000_000,
        "cache_bytes": 20_000_000,
        "downloads_active": 1,
        "downloads": [
            {
                "digest": digest,
                "size": 20_000_000,
                "have": 5_000_000,
                "sources": {"peer:h2": 3_000_000, "registry": 2_000_000},
            }
        ],
    }
    lines = render(after, before, 2.0).splitlines()
    assert lines[0] == "p2pd h1"
    assert "cache: 20.0 MB, 0 hits, 0 streamed uncached; downloads: 1 active" in lines[1]
    rows = {line.split("  ")[0]: line.split() for line in lines}
    assert rows["from peers"][-4:] == ["5.0", "MB", "2.0", "MB/s"]
    assert rows["to runtimes"][-4:] == ["4.0", "MB", "2.0", "MB/s"]
    (download,) = [line.split() for line in lines if line.startswith("sha256:abab")]
    assert download[1:6] == ["25.0%", "20.0", "MB", "2.0", "MB/s"]
    assert " ".join(download[6:]) == "peer:h2=3.0 MB, registry=2.0 MB"
    # the raw counters follow, one "name value" per line, for scripts
    assert ["bytes_to_clients", "4000000"] in [line.split() for line in lines]


def test_p2pd_status_says_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.harness.procs import free_port

    port = free_port()
    assert (
        p2pd_cli.main(
            ["status", "--peer-listen", f"0.0.0.0:{port}", "--advertise", f"10.0.0.1:{port}"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(f"p2pd: no daemon answers at http://127.0.0.1:{port}/stats")
