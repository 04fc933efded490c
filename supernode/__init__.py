"""supernode: tracker and first seed of the container-layer swarm."""
