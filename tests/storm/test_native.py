"""The compiled core and simulator (p2pd.native) decide exactly as the Python ones do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pd import native

# Storms of every kind the presets have, small: each run's completions, messages and bytes.
RUN = """
import hashlib, json, sys
from dataclasses import replace
from benchmarks.storm.presets import PRESETS
from benchmarks.storm.sim import Sim
import p2pd.core.scheduler, p2pd.native
out = {"status": p2pd.native.status(), "scheduler": p2pd.core.scheduler.__file__}
for name, n in [("storm-a", 40), ("storm-a-cpu", 40), ("churn", 40), ("zones", 45),
                ("supernode-failure", 40), ("slow-hosts", 40), ("rolling", 40)]:
    r = Sim(replace(PRESETS[name], nodes=n, layers=(3 << 20, 17 << 20, 40 << 20))).run()
    facts = (r.completion, r.control_messages, r.supernode_upload_bytes,
             r.registry_egress_bytes, r.cross_zone_bytes)
    out[name] = hashlib.sha256(repr(facts).encode()).hexdigest()
print(json.dumps(out))
"""


def run(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", RUN],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_the_compiled_simulator_decides_as_the_python_one(tmp_path: Path) -> None:
    folder = tmp_path / "native"
    subprocess.run(
        [sys.executable, "-m", "p2pd.native", "build", "--out", str(folder)],
        capture_output=True,
        timeout=900,
        check=True,
    )
    compiled = run({"P2P_NATIVE": "1", "P2P_NATIVE_DIR": str(folder)})
    python = run({"P2P_NATIVE": "0", "P2P_NATIVE_DIR": str(folder)})
    assert compiled.pop("status") == native.COMPILED
    assert compiled.pop("scheduler").startswith(str(folder))
    assert python.pop("status") == "pure Python (P2P_NATIVE=0)"
    assert python.pop("scheduler").endswith("scheduler.py")
    assert compiled == python


def test_a_build_is_used_only_while_every_source_is_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2P_NATIVE_DIR", str(tmp_path))
    assert "no build" in (native.check(tmp_path) or "")
    stamp = json.loads(json.dumps(native._stamp()))
    (tmp_path / native.STAMP).write_text(json.dumps(stamp))
    assert native.check(tmp_path) is None
    # one source edited since the build: the whole build is set aside
    stamp["sources"]["p2pd/core/picker.py"] = "0" * 64
    (tmp_path / native.STAMP).write_text(json.dumps(stamp))
    assert "stale" in (native.check(tmp_path) or "")
    (tmp_path / native.STAMP).write_text("{not json")
    assert "unreadable" in (native.check(tmp_path) or "")
