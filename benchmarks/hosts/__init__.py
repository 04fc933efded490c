"""Real hosts: the daemons, a registry and containerd in network namespaces with tbf limits.

`p2p-bench hosts` (`benchmarks.hosts.bench.main`) and the data-plane figures
(`benchmarks.hosts.micro_dataplane.main`); `cluster` builds the fleet both the benchmark and
tests/hosts use.
"""
