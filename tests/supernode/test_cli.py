"""The ``supernode`` command line: help, configuration errors, start-up failures.

Running until a signal and stopping cleanly is covered by test_integration.py, which runs the
real process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supernode import cli


def test_help_lists_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "supernode.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    flags = [
        "--config",
        "--listen",
        "--advertise",
        "--data-dir",
        "--upstream",
        "--quota",
        "--log-level",
    ]
    for flag in flags:
        assert flag in out
    assert "NOT YET" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", "http://127.0.0.1:5000"], "data_dir: required"),
        (["--data-dir", "d"], "allowed_upstreams: at least one"),
        (["--data-dir", "d", "--upstream", "ftp://x"], "allowed_upstreams[0]"),
        (["--data-dir", "d", "--upstream", "http://r", "--listen", "nope"], "listen:"),
        (["--data-dir", "d", "--upstream", "http://r", "--quota", "-1"], "quota_bytes:"),
        (["--config", "/nonexistent/supernode.toml"], "cannot read config file"),
    ],
)
def test_configuration_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernode: configuration error: ")
    assert message in err


def test_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "supernode.toml"
    config.write_text('data_dir = "d"\nallowed_upstreams = ["http://r"]\n[fetch]\nretries = -1\n')
    assert cli.main(["--config", str(config)]) == 2
    assert "fetch.retries: must be 0..100" in capsys.readouterr().err


def test_port_in_use_exits_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--data-dir", str(tmp_path), "--upstream", "http://127.0.0.1:1"]
        argv += ["--listen", f"127.0.0.1:{port}"]
        assert cli.main(argv) == 1
    assert "cannot run" in caplog.text and "in use" in caplog.text


def test_unusable_data_dir_exits_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["--data-dir", str(blocker / "data"), "--upstream", "http://127.0.0.1:1"]
    argv += ["--listen", "127.0.0.1:0"]
    assert cli.main(argv) == 1
    assert "cannot run" in caplog.text


def test_environment_errors_exit_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERNODE_DATA_DIR", "d")
    monkeypatch.setenv("SUPERNODE_ALLOWED_UPSTREAMS", "http://r")
    monkeypatch.setenv("SUPERNODE_FETCH_READ_TIMEOUT", "-3")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "fetch.read_timeout: must be > 0, got -3.0 (set by SUPERNODE_FETCH_READ_TIMEOUT)" in err
    # a flag wins over the variable
    assert cli.main(["--fetch-read-timeout", "1", "--listen", "bad"]) == 2
    assert "listen: expected HOST:PORT, got 'bad' (set by --listen)" in capsys.readouterr().err


def test_every_option_has_a_flag() -> None:
    from supernode.config import OPTIONS

    text = cli.build_parser().format_help()
    for option in OPTIONS:
        assert option.flag in text, option
    assert "SUPERNODE_" in text
