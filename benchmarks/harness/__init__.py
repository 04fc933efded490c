"""Test and benchmark harness: real registries, token server, images and container clients.

Synchronous and subprocess-based, for integration and end-to-end tests, ``make demo`` and the
real-host benchmarks. Every server binds to 127.0.0.1 and every wait has a deadline.

* :mod:`~benchmarks.harness.procs` — child processes, free ports, bounded waits.
* :mod:`~benchmarks.harness.registry` — a real ``docker-registry`` and what it served.
* :mod:`~benchmarks.harness.tokenserver` — a Docker-Hub-style token server.
* :mod:`~benchmarks.harness.image` — deterministic OCI images and pushing them.
* :mod:`~benchmarks.harness.regauth` — Basic/bearer challenge answering for httpx.
* :mod:`~benchmarks.harness.clients` — containerd (ctr), skopeo and podman pulls.
"""
