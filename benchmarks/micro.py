"""Core microbenchmarks (`p2p-bench micro`): figures printed as JSON, never pass/fail.

- scheduler: supernode decisions (register/announce/report calls) per second while a lockstep
  swarm of 1000 peers fetches a 256-piece blob through the real `Scheduler` and `PiecePicker`.
  Only the time inside scheduler calls counts.
- manifest: encode and decode of a 2560-piece Assignment (columnar hashes, 4 parents) with the
  real wire code, against msgpack of the same manifest as one dict per piece.
- verify: piece verification through `PieceManifest.verify` against raw ``xxh3_128_digest``
  on the same 4 MiB pieces in the same run (goal: >= 90% of raw).

Times are the best of several repetitions, since the machines are shared and noisy.
"""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack
import xxhash

from benchmarks.lockstep import LockstepSwarm
from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import HASH_SIZE, PieceManifest

MiB = 1024 * 1024


def best_of(repeat: int, number: int, fn: Callable[[], object]) -> float:
    """Best mean seconds per call over `repeat` runs of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def bench_scheduler(seed: int, peers: int, pieces: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = LockstepSwarm(peers, pieces, seed, timer=time.perf_counter).run()
    wall = time.perf_counter() - t0
    return {
        "peers": peers,
        "pieces": pieces,
        "rounds": result.rounds,
        "decisions": result.scheduler_calls,
        "scheduler_seconds": round(result.scheduler_seconds, 4),
        "decisions_per_s": round(result.scheduler_calls / result.scheduler_seconds),
        "swarm_wall_seconds": round(wall, 3),
        "all_complete": not result.incomplete,
    }


def bench_manifest(repeat: int) -> dict[str, Any]:
    pieces = 2560
    layout = PieceLayout(pieces * 4 * MiB, 4 * MiB)
    digest = Digest("ab" * 32)
    rng = random.Random(5)
    hashes = rng.randbytes(pieces * HASH_SIZE)
    parents = tuple(
        wire.ParentInfo(
            f"peer-{i}", f"peer{i}.test:65003", "z0", Bitfield(pieces, rng.getrandbits(pieces))
        )
        for i in range(4)
    )
    msg = wire.Assignment(
        digest, "ready", layout.total_size, layout.piece_size, 0, hashes, True, parents
    )
    body = wire.encode(msg)
    encode_s = best_of(repeat, 200, lambda: wire.encode(msg))
    decode_s = best_of(repeat, 200, lambda: wire.decode(body, wire.Assignment))
    as_dicts = [{"index": i, "xxh3": hashes[i * 16 : (i + 1) * 16]} for i in range(pieces)]
    dict_encode_s = best_of(repeat, 10, lambda: msgpack.packb(as_dicts))
    extend_s = best_of(repeat, 200, lambda: PieceManifest(digest, layout).extend(0, hashes))
    return {
        "pieces": pieces,
        "parents": len(parents),
        "bytes": len(body),
        "encode_us": round(encode_s * 1e6, 1),
        "decode_us": round(decode_s * 1e6, 1),
        "manifest_extend_us": round(extend_s * 1e6, 1),
        "dict_per_piece_encode_us": round(dict_encode_s * 1e6, 1),
    }


def bench_verify(repeat: int, count: int) -> dict[str, Any]:
    piece = 4 * MiB
    data = [os.urandom(piece) for _ in range(count)]
    layout = PieceLayout(piece * count, piece)
    manifest = PieceManifest(Digest("cd" * 32), layout)
    manifest.extend(0, b"".join(xxhash.xxh3_128_digest(d) for d in data))

    def raw() -> None:
        for d in data:
            xxhash.xxh3_128_digest(d)

    def verify() -> None:
        for i, d in enumerate(data):
            if not manifest.verify(i, d):
                raise AssertionError(f"piece {i} failed verification")

    raw_s = best_of(repeat, 1, raw)
    verify_s = best_of(repeat, 1, verify)
    total = piece * count
    return {
        "piece_bytes": piece,
        "pieces": count,
        "raw_xxh3_gb_per_s": round(total / raw_s / 1e9, 2),
        "verify_gb_per_s": round(total / verify_s / 1e9, 2),
        "ratio_to_raw": round(raw_s / verify_s, 3),
    }


def run_all(seed: int = 1, quick: bool = False) -> dict[str, Any]:
    repeat = 3 if quick else 7
    return {
        "benchmark": "micro",
        "python": platform.python_version(),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
        "quick": quick,
        "scheduler": bench_scheduler(seed, 200 if quick else 1000, 64 if quick else 256),
        "manifest": bench_manifest(repeat),
        "verify": bench_verify(repeat, 8 if quick else 32),
    }
