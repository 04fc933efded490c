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
