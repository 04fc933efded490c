"""The scheduling core and the storm simulator compiled to C with mypyc, used when fresh.

The core is strictly typed Python; mypyc turns those modules into C extensions that decide
exactly as the Python does (the test suite runs the same storms both ways and compares every
completion time), faster: Storm-A (1000 hosts) 117 -> 66 s, 200 hosts ~28 -> ~12 CPU-s.

Build (needs mypy, from the test extras, and a C compiler; 1-2 minutes)::

    .venv/bin/python -m p2pd.native build          # into build/native/ of the checkout

The extensions never sit beside the sources, so an edited module is never shadowed by a stale
build: `activate` uses a build only when every source file of the compiled packages still
hashes as it did when it was built (and for this interpreter), all of it or none of it, and
then imports those modules, by their exact names, from the build.

Who uses it: the storm simulator (`benchmarks.storm`) by default; the daemons (p2pd, the
supernode) only with ``P2P_NATIVE=1`` in their environment -- their tests run on the Python
core. ``P2P_NATIVE=0`` turns it off everywhere. ``P2P_NATIVE_DIR`` names another build folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Sequence
from pathlib import Path

# Compiled together as one group (the modules call each other natively).
MODULES = (
    "p2pd.core.bitfield",
    "p2pd.core.layout",
    "p2pd.core.picker",
    "p2pd.core.session",
    "p2pd.core.scheduler",
    "p2pd.core.freepeers",
    "p2pd.core.uplink",
    "benchmarks.storm.network",
    "benchmarks.storm.sim",
)
# Every module of these packages is hashed into the build's stamp: compiled code trusts the
# types of what it imports from them as well as its own.
PACKAGES = ("p2pd.core", "benchmarks.storm")
GROUP = "p2p_native"
STAMP = "stamp.json"

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = CHECKOUT / "build" / "native"

COMPILED = "compiled (mypyc)"
# What `activate` found, for the benchmarks to print (`status`).
_found = {"status": "pure Python (not asked for)"}


def status() -> str:
    """COMPILED, or why the Python modules are used."""
    return _found["status"]


def build_dir() -> Path:
    return Path(os.environ.get("P2P_NATIVE_DIR") or DEFAULT_DIR)


def _sources(root: Path) -> dict[str, str]:
    """sha256 of every .py file of `PACKAGES` under `root`, by path relative to it."""
    hashes = {}
    for package in PACKAGES:
        folder = root / package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            rel = path.relative_to(root).as_posix()
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _stamp() -> dict[str, object]:
    return {"cache_tag": sys.implementation.cache_tag, "sources": _sources(CHECKOUT)}


def check(folder: Path) -> str | None:
    """Why the build in `folder` cannot be used (None: it can)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except FileNotFoundError:
        return f"no build in {folder} (python -m p2pd.native build)"
    except (OSError, ValueError) as exc:
        return f"unreadable build stamp {folder / STAMP}: {exc}"
    if stamp != _stamp():
        return f"the build in {folder} is stale: sources or interpreter changed since"
    return None


def activate(*, default: bool) -> bool:
    """Use the compiled modules from now on, if wanted (``P2P_NATIVE``, else `default`) and
    the build is fresh; must run before any compiled module is imported. Returns whether the
    compiled modules are (now) in use; `status` says why not."""
    if _found["status"] == COMPILED:
        return True
    wanted = os.environ.get("P2P_NATIVE", "").strip()
    if wanted not in ("", "0", "1"):
        _found["status"] = f"pure Python (P2P_NATIVE must be 0 or 1, not {wanted!r})"
        return False
    if wanted == "0":
        _found["status"] = "pure Python (P2P_NATIVE=0)"
        return False
    if not wanted and not default:
        return False
    folder = build_dir()
    problem = check(folder)
    if problem is not None:
        _found["status"] = f"pure Python ({problem})"
        return False
    early = [name for name in MODULES if name in sys.modules]
    if early:
        _found["status"] = f"pure Python ({', '.join(early)} imported before the build was)"
        return False
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    files = {name: folder / (name.replace(".", "/") + suffix) for name in MODULES}
    # the group's shared library, which each module's extension imports by this name
    files[f"{GROUP}__mypyc"] = folder / f"{GROUP}__mypyc{suffix}"
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        _found["status"] = f"pure Python ({', '.join(missing)} missing in {folder})"
        return False
    sys.meta_path.insert(0, _Finder(files))
    _found["status"] = COMPILED
    return True


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules (and their group's library) in the build, by exact name;
    every other module is left to the usual finders."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def build(out: Path) -> None:
    """Compile `MODULES` into `out` (replaced) and stamp it with the sources' hashes."""
    from mypyc.build import mypycify  # the test extras' mypy
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    stamp = _stamp()  # before compiling: a source edited meanwhile leaves the build stale
    paths = [name.replace(".", "/") + ".py" for name in MODULES]  # from the checkout
    with tempfile.TemporaryDirectory(prefix="p2p-native-") as tmp:
        here = Path.cwd()
        os.chdir(CHECKOUT)  # mypy resolves the modules' imports from the checkout
        try:
            extensions = mypycify(
                paths,
                opt_level="3",
                group_name=GROUP,
                target_dir=os.path.join(tmp, "c"),
            )
            lib = Path(tmp) / "lib"
            dist = Distribution({"name": GROUP, "ext_modules": extensions})
            command = build_ext(dist)
            command.build_lib = str(lib)
            command.build_temp = os.path.join(tmp, "obj")
            command.parallel = os.cpu_count() or 1
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(here)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(lib, out)
    (out / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pd.native", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the core and the simulator with mypyc")
    b.add_argument("--out", type=Path, default=None, help=f"folder (default {DEFAULT_DIR})")
    sub.add_parser("check", help="say whether the build can be used")
    args = parser.parse_args(argv)
    folder = args.out if args.command == "build" and args.out else build_dir()
    if args.command == "build":
        build(folder)
        print(f"built {len(MODULES)} modules into {folder}")
        return 0
    problem = check(folder)
    print(problem or f"fresh: {folder}")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
